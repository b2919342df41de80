"""Where the rank-0 QAT gap comes from, measured without training: PTQ of the reference DiT from
`w4a4-svd` step by step to `w4a4-qat`'s quantizers (asymmetric activations, rotation, no
smoothing), with SVDQuant's rank-32 branch and at rank 0 (what QAT ends as, before any training;
QAT's own start differs: its branch corrects Q(W) instead of taking W's top singular part). For each:
PSNR of samples vs full precision (same seeds) and the per-call error of the denoiser's output on
held-out full-precision trajectories (the quantity QAT minimises), overall and per noise half.

    python samples/qat_gap.py [--n 16] [--json samples/results/qat/qat-gap-cpu.json]
"""
import argparse
import copy
import json
from dataclasses import replace

import torch
from qat_reference import CALIB_SEED, EVAL_SEED, call_error, held_out_calls

import vqz
from vqz.config import get_preset, get_qat_preset
from vqz.eval.images import psnr, ssim
from vqz.pipelines.reference import load_reference, sample


def variants() -> dict:
    svd = get_preset("w4a4-svd")
    qat = get_qat_preset("w4a4-qat")
    asym = replace(qat.act, learnable=False)  # w4a4-qat's activations with their clip ratio at 1
    return {
        "w4a4-svd": svd,
        "w4a4-svd, no smoothing": replace(svd, smooth=False),
        "w4a4-svd, asymmetric activations": replace(svd, act=asym),
        "w4a4-svd, asymmetric activations, rotation": replace(svd, act=asym, rotate=True),
        "asymmetric, rotation, no smoothing (w4a4-qat's quantizers), rank-32 branch":
            replace(svd, act=asym, rotate=True, smooth=False),
        "the same at rank 0 (w4a4-qat's end state, untrained)":
            replace(svd, act=asym, rotate=True, smooth=False, rank=0),
        "rank 0, asymmetric, rotation, smoothing": replace(svd, act=asym, rotate=True, rank=0),
        "rank 0, asymmetric, smoothing": replace(svd, act=asym, rank=0),
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=16, help="evaluation images")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--json")
    args = p.parse_args()
    fp = load_reference("dit").to("cuda" if torch.cuda.is_available() else "cpu")
    reference = sample(fp, n=args.n, seed=EVAL_SEED, steps=args.steps)
    held_out = held_out_calls(fp, args.steps, n=8)
    rows = []
    for label, cfg in variants().items():
        q = vqz.quantize(copy.deepcopy(fp), replace(cfg, name=label),
                         calib=lambda m: sample(m, n=16, seed=CALIB_SEED, steps=args.steps))
        images = sample(q, n=args.n, seed=EVAL_SEED, steps=args.steps)
        rows.append({"variant": label, "psnr_db": psnr(images, reference).mean().item(),
                     "ssim": ssim(images, reference).mean().item(), "call_mse": call_error(q, held_out)})
        e = rows[-1]["call_mse"]
        print(f"{label:72s} PSNR {rows[-1]['psnr_db']:6.2f} dB  call MSE {e['all']:.2e} "
              f"(t >= 500: {e['t>=500']:.2e}, t < 500: {e['t<500']:.2e})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": args.n, "steps": args.steps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
