"""Accuracy of two-level group scales (integer multipliers 1..16 under one fp scale per row, what the
INT8 kernels run) against fp32 group scales, on the reference DiT: PSNR of samples vs full precision.

    python samples/two_level_accuracy.py [--n 32] [--json samples/results/two_level.json]
"""
from dataclasses import replace

from quality_table import NAIVE_W4A4, evaluate, quality_run, save_results

import vqz
from vqz.config import get_preset
from vqz.eval.outliers import inject_outliers
from vqz.pipelines.reference import load_reference


def two_level(cfg: vqz.QuantConfig, levels: int = 16) -> vqz.QuantConfig:
    return replace(cfg, name=f"{cfg.name}-2l", weight=replace(cfg.weight, int_group_scales=levels),
                   act=replace(cfg.act, int_group_scales=levels))


def variants():
    rows = []
    for label, cfg in [("naive W4A4", NAIVE_W4A4), ("w4a4", get_preset("w4a4")),
                       ("w4a4-svd", get_preset("w4a4-svd"))]:
        rows += [(f"{label}, fp32 group scales", cfg, {}),
                 (f"{label}, two-level scales", two_level(cfg), {})]
    return rows


def main():
    args, device, results = quality_run(__doc__)
    dit = load_reference("dit").to(device)
    print("DiT, as trained")
    results["dit"] = evaluate(dit, variants(), args.n, args.steps)
    print("DiT, injected outliers (scale 50, 1% of channels)")
    inject_outliers(dit, scale=50.0, fraction=0.01)
    results["dit_outliers"] = evaluate(dit, variants(), args.n, args.steps)
    save_results(args, results)


if __name__ == "__main__":
    main()
