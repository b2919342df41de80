"""Accuracy of quantizing fused q/k/v projections (diffusers' fuse_qkv_projections: one layer, so
one smoothing vector and one low-rank branch for the three) against separate ones, on the reference
DiT: PSNR of samples vs full precision. Fusing is what lets the kernels run one GEMM per attention
input (BENCHMARKS.md, FLUX block).

    python samples/fused_projections_accuracy.py [--n 32] [--json samples/results/fused-qkv.json]
"""

from quality_table import evaluate, quality_run, save_results

from vqz.pipelines.reference import load_reference

VARIANTS = [(name, name, {}) for name in ("w4a4-svd", "w4a4-svd-fast")]


def fuse_attention_projections(model) -> None:
    """What the FLUX/SD3/PixArt model classes' fuse_qkv_projections() does, for a DiT, whose
    class lacks it: fused layers and the processor that calls them."""
    from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0

    for module in model.modules():
        if isinstance(module, Attention):
            module.fuse_projections()
            module.set_processor(FusedAttnProcessor2_0())


def main():
    args, device, results = quality_run(__doc__)
    dit = load_reference("dit").to(device)
    print("DiT, separate q/k/v projections")
    results["separate"] = evaluate(dit, VARIANTS, args.n, args.steps)
    fuse_attention_projections(dit)
    print("DiT, fused q/k/v projections")
    results["fused"] = evaluate(dit, VARIANTS, args.n, args.steps)
    save_results(args, results)


if __name__ == "__main__":
    main()
