"""Quality of each preset on the project's reference models: samples against full precision.

For the class-conditional DiT and the UNet trained on CIFAR-10 (samples/train_reference.py), draw the
same seeds from the full-precision model and from each quantized variant (DDIM, 25 steps, guidance
3 for the DiT) and report PSNR/SSIM of the quantized samples against the full-precision ones. The
DiT is measured as trained and with injected outliers (scale 50 on 1% of the channels feeding the
attention projections, function-preserving); the UNet with split-shortcut quantization on and off.
Calibration runs the sampler on seeds disjoint from the evaluation seeds.

    python samples/quality_table.py --n 32 --json quality.json
"""
from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import vqz
from vqz.eval.images import psnr, ssim
from vqz.eval.outliers import inject_outliers
from vqz.pipelines.reference import load_reference, sample

NAIVE_W4A4 = vqz.QuantConfig(
    "w4a4-naive", weight=vqz.QuantSpec("int4", "group", 64, observer="minmax"),
    act=vqz.QuantSpec("int4", "group", 64, dynamic=True))
DIT_VARIANTS = [("w8a8", "w8a8", {}), ("w4a8 (RTN)", "w4a8", {}), ("w4a8-gptq", "w4a8-gptq", {}),
                ("naive W4A4 (RTN, min-max)", NAIVE_W4A4, {}), ("w4a4 (RTN, MSE weights)", "w4a4", {}),
                ("w4a4-svd", "w4a4-svd", {}), ("w4a4-svd + GPTQ", "w4a4-svd", {"gptq": True}),
                ("nvfp4-svd", "nvfp4-svd", {})]
# Q-Diffusion's setting, where split-shortcut matters: one static activation scale per tensor.
W4A8_STATIC = vqz.QuantConfig(
    "w4a8-static", weight=vqz.QuantSpec("int4", "group", 64, observer="mse"),
    act=vqz.QuantSpec("int8", "tensor", symmetric=False, observer="mse"))
UNET_VARIANTS = [("w8a8", "w8a8", {}),
                 ("w8a8-static, split-shortcut on", "w8a8-static", {}),
                 ("w8a8-static, split-shortcut off", "w8a8-static", {"split_shortcut": False}),
                 ("w8a8-static, split on, 4 timestep ranges", "w8a8-static", {"timestep_buckets": 4}),
                 ("w4a8-static, split-shortcut on", W4A8_STATIC, {}),
                 ("w4a8-static, split-shortcut off", W4A8_STATIC, {"split_shortcut": False}),
                 ("w4a8-static, split on, 4 timestep ranges", W4A8_STATIC, {"timestep_buckets": 4}),
                 ("w4a8-gptq, split-shortcut on", "w4a8-gptq", {}),
                 ("w4a8-gptq, split-shortcut off", "w4a8-gptq", {"split_shortcut": False}),
                 ("w4a8 (RTN), split-shortcut on", "w4a8", {}),
                 ("w4a8 (RTN), split-shortcut off", "w4a8", {"split_shortcut": False})]


def evaluate(model, variants, n, steps, calib_seed=1000):
    reference = sample(model, n=n, seed=0, steps=steps)
    rows = []
    for label, preset, overrides in variants:
        start = time.perf_counter()
        quantized = vqz.quantize(copy.deepcopy(model), preset, calib=sampler_loop(steps, calib_seed),
                                 **overrides)
        images = sample(quantized, n=n, seed=0, steps=steps)
        rows.append({"variant": label, "psnr_db": psnr(images, reference).mean().item(),
                     "ssim": ssim(images, reference).mean().item(),
                     "seconds": time.perf_counter() - start})
        print(f"  {label:42s} PSNR {rows[-1]['psnr_db']:6.2f} dB  SSIM {rows[-1]['ssim']:.4f}", flush=True)
    return rows


def sampler_loop(steps, seed):
    """calib= for vqz.quantize: the sampler itself over a full trajectory, on other seeds."""
    return lambda m: sample(m, n=16, seed=seed, steps=steps)


def quality_run(description: str):
    """(args, device, results dict) for a sample-quality script: --n, --steps, --json."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=32, help="evaluation images per variant")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--json")
    args = p.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "n": args.n, "steps": args.steps}
    return args, device, results


def save_results(args, results: dict) -> None:
    """Write `results` to --json, when given."""
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def evaluate_dit(variants, args, device) -> dict:
    """The reference DiT's rows, as trained ("dit") and with injected outliers ("dit_outliers")."""
    dit = load_reference("dit").to(device)
    print("DiT, as trained")
    rows = {"dit": evaluate(dit, variants, args.n, args.steps)}
    print("DiT, injected outliers (scale 50, 1% of channels)")
    inject_outliers(dit, scale=50.0, fraction=0.01)
    rows["dit_outliers"] = evaluate(dit, variants, args.n, args.steps)
    return rows


def main():
    args, device, results = quality_run(__doc__)
    results.update(evaluate_dit(DIT_VARIANTS, args, device))
    unet = load_reference("unet").to(device)
    print("UNet")
    results["unet"] = evaluate(unet, UNET_VARIANTS, args.n, args.steps)
    save_results(args, results)


if __name__ == "__main__":
    main()
