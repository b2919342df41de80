"""Block-Hadamard rotation (QuantConfig.rotate) on the reference DiT: each recipe with and without
it, samples against full precision (as samples/quality_table.py measures them), as trained and with
injected outliers.

    python samples/rotation_quality.py --n 32 --json rotation.json
"""
from __future__ import annotations

from dataclasses import replace

from quality_table import evaluate_dit, quality_run, save_results
from vqz.config import get_preset

W4A4 = get_preset("w4a4")
W4A4_ASYM = replace(W4A4, name="w4a4-asym", act=replace(W4A4.act, symmetric=False))
RECIPES = [("w4a4", "w4a4"), ("w4a4, asymmetric activations", W4A4_ASYM), ("w4a4-svd", "w4a4-svd"),
           ("w4a8", "w4a8")]
VARIANTS = [(f"{label}{suffix}", recipe, {"rotate": rotate}) for label, recipe in RECIPES
            for suffix, rotate in (("", False), (" + rotation", True))]


def main():
    args, device, results = quality_run(__doc__)
    results.update(evaluate_dit(VARIANTS, args, device))
    save_results(args, results)


if __name__ == "__main__":
    main()
