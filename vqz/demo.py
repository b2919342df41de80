"""`vqz demo`: quantize the bundled reference DiT offline and compare its samples with full precision.

The DiT is the project's class-conditional CIFAR-10 model (pipelines/reference.py). It is quantized
to each demo preset, calibrated on its own sampling trajectories (seeds disjoint from the shown ones),
and every variant draws the same seeds. Writes grid.png (one row per variant, full precision first)
and metrics.json (PSNR/SSIM of each variant's samples against the full-precision samples).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

from .api import quantize
from .eval.images import image_grid, psnr, ssim

DEMO_PRESETS = ("w4a8", "w4a4-svd")
IMAGES, STEPS, CALIB_SEED = 10, 25, 1000


def run_demo(out: Path) -> dict:
    from .pipelines.reference import load_reference, sample

    start = time.perf_counter()
    dit = load_reference("dit")
    reference = sample(dit, n=IMAGES, seed=0, steps=STEPS)
    rows, metrics = [reference], {}
    for preset in DEMO_PRESETS:
        calib = lambda m: sample(m, n=8, seed=CALIB_SEED, steps=STEPS)  # noqa: E731
        quantized = quantize(copy.deepcopy(dit), preset, calib=calib)
        images = sample(quantized, n=IMAGES, seed=0, steps=STEPS)
        rows.append(images)
        metrics[preset] = {"psnr_db": psnr(images, reference).mean().item(),
                           "ssim": ssim(images, reference).mean().item()}
    out.mkdir(parents=True, exist_ok=True)
    image_grid(rows).resize((IMAGES * 34 * 3, len(rows) * 34 * 3), 0).save(out / "grid.png")
    (out / "metrics.json").write_text(json.dumps(
        {"model": "reference DiT (CIFAR-10, 32x32, class-conditional)", "images": IMAGES,
         "steps": STEPS, "presets": metrics}, indent=2))
    print(f"{'preset':10s} {'PSNR dB':>8s} {'SSIM':>6s}   (samples vs full precision, same seeds)")
    for preset, m in metrics.items():
        print(f"{preset:10s} {m['psnr_db']:8.2f} {m['ssim']:6.3f}")
    print(f"wrote {out / 'grid.png'} (rows: full precision, {', '.join(DEMO_PRESETS)}) and "
          f"{out / 'metrics.json'} in {time.perf_counter() - start:.0f} s")
    return metrics
