"""Tile-shape sweep of the activation kernel and the INT8 GEMM on FLUX shapes (GPU), to choose the
defaults in kernels/act_quant.py (ACT_CONFIG) and kernels/int8_gemm.py (_config), with and without
the rank-32 branch; also times the branch's down-projection on cuBLAS.

    python samples/kernel_sweep.py [--act-only | --w4a16 | --unpack]
"""
import itertools
import sys

import torch

from vqz.kernels import act_quant
from vqz.kernels.bench import _graph_time_ms, _Layer
from vqz.kernels.int8_gemm import int8_gemm

SHAPES = [(4608, 12288, 3072), (4608, 3072, 12288), (4608, 3072, 3072), (1024, 3072, 3072)]


def sweep_act():
    for m, _, k in SHAPES[:2] + SHAPES[3:]:
        xs = [torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for _ in range(4)]
        lam = torch.rand(k, device="cuda") + 0.5
        floor = m * k * 3 / 3.0e12 * 1e6
        two_pass = [dict(BLOCK_M=bm, BLOCK_K=bk, CHUNK=chunk, num_warps=w) for bm, bk, chunk, w
                    in itertools.product((32,), (128, 256), (512, 1024), (4, 8))]
        # one launch: each program finds its rows' range itself, then reads them again (from L2)
        inline = [dict(BLOCK_M=bm, BLOCK_K=bk, CHUNK=0, num_warps=w, INLINE=True) for bm, bk, w
                  in itertools.product((1, 2, 4, 8, 16), (256, 512, 1024), (4, 8))]
        rows = []
        for cfg in two_pass + inline:
            t = _graph_time_ms([lambda x=x: act_quant.act_quant_group(x, lam, config=cfg)
                                for x in xs]) * 1e3
            rows.append((t, cfg))
        rows.sort(key=lambda r: r[0])
        print(f"act M={m} K={k}: best two-pass {min(t for t, c in rows if 'INLINE' not in c):.0f}us, "
              f"best one-launch {min(t for t, c in rows if 'INLINE' in c):.0f}us", flush=True)
        l1 = torch.randn(k, 32, device="cuda", dtype=torch.bfloat16)
        down = _graph_time_ms([lambda x=x: x @ l1 for x in xs]) * 1e3
        print(f"act M={m} K={k} (bytes floor {floor:.0f}us; the branch's x L1 on cuBLAS "
              f"{down:.0f}us): " + " | ".join(f"{t:.0f}us {c}" for t, c in rows[:6]), flush=True)


def sweep_gemm():
    for m, n, k in SHAPES:
        # realistic operands: two-level INT4 codes of Gaussian activations and weights
        a, sa = act_quant.act_quant_group(torch.randn(m, k, device="cuda", dtype=torch.bfloat16),
                                          None)
        layer = _Layer(n, k, 0)
        b, sb = layer.w8, layer.unit
        xl1 = torch.randn(m, 32, device="cuda", dtype=torch.bfloat16)
        l2 = torch.randn(32, n, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bf16 = _graph_time_ms([lambda: x @ w.T]) * 1e3
        rows = []
        for (bm, bn, bk, warps, stages, maxnreg), branch in itertools.product(
                [(256, 128, 128, 8, 3, None), (128, 128, 64, 4, 5, None),
                 (128, 128, 128, 8, 3, None), (128, 128, 128, 8, 3, 128),
                 (128, 256, 128, 8, 3, None), (128, 128, 128, 4, 4, None)], (True, False)):
            cfg = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
                       maxnreg=maxnreg)
            extra = dict(xl1=xl1, l2=l2) if branch else {}
            t = _graph_time_ms([lambda: int8_gemm(a, b, sa, sb, config=cfg, **extra)])
            rows.append((t * 1e3, dict(cfg, branch=branch)))
        rows.sort(key=lambda r: r[0])
        print(f"gemm {m}x{n}x{k}: bf16 {bf16:.0f}us | " +
              " | ".join(f"{t:.0f}us ({bf16 / t:.2f}x) {c}" for t, c in rows[:6]), flush=True)


def sweep_w4a16():
    """W4A16 at M = 1 and 16 on FLUX's weight shapes: how many programs per multiprocessor split K
    aims at, warps, pipeline depth."""
    from vqz.kernels.bench import _copies
    from vqz.kernels.int4_weights import w4a16_gemm

    relative = {}  # per config, the sum over the shapes of its time / BF16's
    for m, (n, k) in itertools.product((1, 16), [(9216, 3072), (12288, 3072), (3072, 12288),
                                                 (3072, 3072)]):
        layers = [_Layer(n, k, seed) for seed in range(_copies(n * k * 2))]
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        bf16 = _graph_time_ms([lambda w=layer.w: x @ w.T for layer in layers]) * 1e3
        rows = []
        for waves, warps, stages in itertools.product((2, 3, 4, 6), (4, 8), (3, 4)):
            cfg = dict(WAVES=waves, num_warps=warps, num_stages=stages)
            t = _graph_time_ms([lambda layer=layer: w4a16_gemm(x, layer.w16_words, layer.w16_scale,
                                                               k, 128, config=cfg)
                                for layer in layers]) * 1e3
            rows.append((t, cfg))
            relative[str(cfg)] = relative.get(str(cfg), 0.0) + t / bf16
        rows.sort(key=lambda r: r[0])
        print(f"w4a16 M={m} {n}x{k}: bf16 {bf16:.1f}us | " +
              " | ".join(f"{t:.1f}us ({bf16 / t:.2f}x) {c}" for t, c in rows[:5]), flush=True)
    best = min(relative, key=relative.get)
    print(f"w4a16 best over the shapes: {best} (mean time / BF16 {relative[best] / 8:.3f})")


def sweep_unpack():
    """The memory layout's unpack of packed 4-bit weights (group 64) into int8, on FLUX's weight
    shapes: rows and groups per program. It moves 1.5 bytes per weight (reads 1/2, writes 1)."""
    from vqz.kernels.bench import _copies
    from vqz.kernels.int4_weights import unpack_int4

    totals = {}
    for n, k in [(9216, 3072), (12288, 3072), (3072, 12288), (3072, 3072)]:
        layers = [_Layer(n, k, seed) for seed in range(_copies(n * k * 3 // 2))]
        out = torch.empty(n, k, device="cuda", dtype=torch.int8)
        rows = []
        for bn, bg, warps in itertools.product((4, 8, 16, 32), (1, 2, 4, 8), (4, 8)):
            cfg = dict(BLOCK_N=bn, BLOCK_G=bg, num_warps=warps)
            t = _graph_time_ms([lambda layer=layer: unpack_int4(layer.packed, layer.mult, k, 64,
                                                                out=out, config=cfg)
                                for layer in layers]) * 1e3
            rows.append((t, cfg))
            totals[str(cfg)] = totals.get(str(cfg), 0.0) + t
        rows.sort(key=lambda r: r[0])
        print(f"unpack {n}x{k}: " + " | ".join(
            f"{t:.1f}us ({n * k * 1.5 / t / 1e6:.2f} TB/s) {c}" for t, c in rows[:5]), flush=True)
    best = min(totals, key=totals.get)
    print(f"unpack best over the shapes: {best} ({totals[best]:.1f}us in total)")


if __name__ == "__main__":
    if "--w4a16" in sys.argv:
        sweep_w4a16()
    elif "--unpack" in sys.argv:
        sweep_unpack()
    else:
        sweep_act()
    if not {"--act-only", "--w4a16", "--unpack"} & set(sys.argv):
        sweep_gemm()
