"""Top-1 of the reference CIFAR-10 ViT quantized with each ViT preset, on held-out images.

Calibration: 32 training images. Evaluation: the 2000 held-out images of `cifar10_split`. Also with
injected LayerNorm outliers (scale 50 on 1% of the channels feeding each attention's qkv,
function-preserving) and a naive per-tensor W4A4 baseline.

    python samples/vit_quality.py --data $VQZ_DATA/cifar10/cifar10_test.npz --json vit.json
"""
from __future__ import annotations

import argparse
import copy
import json
import os

import torch

import vqz
from vqz.config import AttnSpec
from vqz.eval.outliers import inject_outliers
from vqz.pipelines.reference_vit import cifar10_split, load_reference_vit, preprocess, top1

# Everything per tensor with min-max ranges, attention products and log2 softmax included.
NAIVE_W4A4 = vqz.QuantConfig(
    "w4a4-per-tensor", weight=vqz.QuantSpec("int4", "tensor"),
    act=vqz.QuantSpec("int4", "tensor", symmetric=False),
    attn=AttnSpec(vqz.QuantSpec("int4", "tensor"), vqz.QuantSpec("log2:4", "tensor")))
VARIANTS = [("vit-w8a8", "vit-w8a8"), ("vit-w6a6", "vit-w6a6"), ("vit-w4a4", "vit-w4a4"),
            ("naive per-tensor W4A4", NAIVE_W4A4)]


def evaluate(model, calib, images, labels):
    rows = {"full precision": 100 * top1(model, images, labels)}
    for label, preset in VARIANTS:
        quantized = vqz.quantize(copy.deepcopy(model), preset, calib=[calib])
        rows[label] = 100 * top1(quantized, images, labels)
        print(f"  {label:24s} top-1 {rows[label]:6.2f}  (full precision {rows['full precision']:.2f})",
              flush=True)
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=os.path.join(os.environ.get("VQZ_DATA", "../shared/data"),
                                                  "cifar10", "cifar10_test.npz"))
    p.add_argument("--json")
    args = p.parse_args()
    train_x, _, held_x, held_y = cifar10_split(args.data)
    calib = preprocess(train_x[torch.randperm(len(train_x), generator=torch.Generator().manual_seed(0))[:32]])
    vit = load_reference_vit()
    print("ViT, as trained")
    results = {"as_trained": evaluate(vit, calib, held_x, held_y)}
    inject_outliers(vit, scale=50.0, fraction=0.01)
    print("ViT, injected LayerNorm outliers (scale 50, 1% of channels)")
    results["outliers"] = evaluate(vit, calib, held_x, held_y)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
