"""INT8 GEMM on the tensor cores with every floating-point step in the epilogue.

y = act(((A Bᵀ) - zp ⊗ colsum(B)) · (s_a ⊗ s_b) + xl1 L2 + bias), A [M, K] int8 activations,
B [N, K] int8 weights (row-major, as stored), int32 accumulation. The K loop only loads tiles and
issues MMAs (measured on Hopper: anything else on the operands costs 2-4×); scales, the asymmetric
zero-point correction, the low-rank up-projection (rank R, a multiple of 16, up to 256), bias and
GELU/SiLU run once per output tile.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .reference import ACTIVATION_NAMES

ACTIVATIONS = {name: code for code, name in enumerate(ACTIVATION_NAMES)}


@triton.jit
def _activation(y, ACT: tl.constexpr):
    if ACT == 1:
        y = y * tl.sigmoid(1.5957691216057308 * (y + 0.044715 * y * y * y))
    elif ACT == 2:
        y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
    elif ACT == 3:
        y = y * tl.sigmoid(y)
    return y


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, sa_ptr, sb_ptr, zp_ptr, wsum_ptr, xl1_ptr, l2_ptr,
                      bias_ptr, M, N, K, HAS_ZP: tl.constexpr, R: tl.constexpr,
                      IEEE: tl.constexpr, HAS_BIAS: tl.constexpr, ACT: tl.constexpr,
                      EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr):
    # Grouped tile order: GROUP_M row blocks sweep the columns together, so B tiles are reused from L2.
    pid = tl.program_id(0)
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    first_m = (pid // (GROUP_M * num_n)) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * num_n)) % group_rows
    pid_n = (pid % (GROUP_M * num_n)) // group_rows

    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Out-of-range rows and columns read valid memory (wrapped) and are never stored.
    am = tl.max_contiguous(tl.multiple_of(rm % M, BLOCK_M), BLOCK_M)
    bn = tl.max_contiguous(tl.multiple_of(rn % N, BLOCK_N), BLOCK_N)
    a_ptrs = a_ptr + am[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + bn[None, :] * K + rk[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=rk[None, :] < K - k0, other=0)
            b = tl.load(b_ptrs, mask=rk[:, None] < K - k0, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    y = acc.to(tl.float32)
    if HAS_ZP:
        zp = tl.load(zp_ptr + am)
        y = y - zp[:, None] * tl.load(wsum_ptr + bn)[None, :]
    y = y * (tl.load(sa_ptr + am)[:, None] * tl.load(sb_ptr + bn)[None, :])
    if R > 0:
        rr = tl.arange(0, R)
        l2 = tl.load(l2_ptr + rr[:, None] * N + bn[None, :])
        xl1 = tl.load(xl1_ptr + am[:, None] * R + rr[None, :]).to(l2.dtype)
        if IEEE:
            y = tl.dot(xl1, l2, y, input_precision="ieee")
        else:
            y = tl.dot(xl1, l2, y)
    if HAS_BIAS:
        y = y + tl.load(bias_ptr + bn).to(tl.float32)[None, :]
    y = _activation(y, ACT)
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(c_ptr + rm[:, None] * N + rn[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


def _config(m: int) -> dict:
    """Tile shapes measured best on Hopper (samples/kernel_sweep.py). The register cap keeps two
    8-warp programs per multiprocessor: the low-rank branch's epilogue took the kernel from 115 to
    130 registers a thread, one program per multiprocessor, and 40-150 us more on FLUX shapes
    (H200); capped at 128 (16 bytes of spills) the branch costs 0-5% over no branch."""
    if m <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=4)
    return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=128, num_warps=8, num_stages=3, maxnreg=128)


def int8_gemm(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor, scale_b: torch.Tensor, *,
              zero_point: torch.Tensor | None = None, colsum_b: torch.Tensor | None = None,
              xl1: torch.Tensor | None = None, l2: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, activation: str | None = None,
              out_dtype: torch.dtype = torch.bfloat16, config: dict | None = None) -> torch.Tensor:
    """a [M, K] int8, b [N, K] int8, scale_a [M], scale_b [N] fp32 -> y [M, N] in `out_dtype`.
    zero_point [M] (with colsum_b [N], fp32) for asymmetric activations; xl1 [M, R] with l2 [R, N]
    for the low-rank branch (multiplied in l2's dtype, accumulated in fp32); bias [N]; activation
    in ACTIVATIONS."""
    m, k = a.shape
    n = b.shape[0]
    r = 0 if xl1 is None else xl1.shape[1]
    c = torch.empty(m, n, device=a.device, dtype=out_dtype)
    cfg = dict(config or _config(m))
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)
    _int8_gemm_kernel[grid](
        a, b, c, scale_a, scale_b, zero_point if zero_point is not None else scale_a,
        colsum_b if colsum_b is not None else scale_b, xl1 if r else scale_a,
        l2 if r else scale_b, bias if bias is not None else scale_b, m, n, k,
        HAS_ZP=zero_point is not None, R=r, IEEE=r > 0 and l2.dtype == torch.float32,
        HAS_BIAS=bias is not None,
        ACT=ACTIVATIONS[activation], EVEN_K=k % cfg["BLOCK_K"] == 0, GROUP_M=8, **cfg)
    return c
