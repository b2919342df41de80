"""Activation kernels: one pass of quantization over a 16-bit input x [M, K], per row block.

Each program owns BLOCK_M rows. It reads them twice, back to back (the second read comes from L2):
once for the row range, once to write the int8 operand of the GEMM and, for SVDQuant layers, the
fp32 down-projection `x̂ L1` of the low-rank branch. No atomics: every output has one writer, so the
results are bitwise identical run to run. Divisions use round-to-nearest (`div_rn`) and rounding is
half-to-even, so codes match the pure-torch quantizer exactly (kernels/reference.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_RANGE_FLOOR = tl.constexpr(1e-8)  # the quantizer's smallest range (vqz/quantizer.py)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + magic) - magic rounds fp32 |v| < 2^22 half-to-even


@triton.jit
def _rne(v):
    return (v + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH: tl.constexpr):
    """x[rows, cols] / λ[cols] in x's dtype (zeros outside the matrix)."""
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    if HAS_SMOOTH:
        lam = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0).to(x.dtype)
        x = tl.math.div_rn(x.to(tl.float32), lam.to(tl.float32)[None, :]).to(x.dtype)
    return x


@triton.jit
def _lowrank_step(acc, xs, l1_ptr, cols, K, R: tl.constexpr, IEEE: tl.constexpr):
    """acc [BM, R] += xs [BM, BK] @ L1[cols, :] with fp32 accumulation."""
    l1 = tl.load(l1_ptr + cols[:, None] * R + tl.arange(0, R)[None, :], mask=cols[:, None] < K,
                 other=0.0).to(xs.dtype)
    if IEEE:
        return tl.dot(xs, l1, acc, input_precision="ieee")
    return tl.dot(xs, l1, acc)


@triton.jit
def _act_group_kernel(x_ptr, smooth_ptr, l1_ptr, a_ptr, unit_ptr, xl1_ptr, M, K, stride_xm,
                      HAS_SMOOTH: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr,
                      GROUP: tl.constexpr, LEVELS: tl.constexpr, QMIN: tl.constexpr,
                      QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Symmetric INT codes per token per group with two-level scales: a = code * multiplier (int8),
    unit [M] fp32; with R > 0 also xl1 = (x / λ) L1 [M, R] fp32."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    amax = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xs = _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.max(tl.abs(xs.to(tl.float32)), axis=1))
    unit = tl.math.div_rn(tl.math.div_rn(tl.maximum(amax, _RANGE_FLOOR), QMAX), LEVELS)
    tl.store(unit_ptr + rows, unit, mask=rows < M)

    acc = tl.zeros([BLOCK_M, R if R > 0 else 16], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xs = _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH)
        v = tl.reshape(xs.to(tl.float32), [BLOCK_M, BLOCK_K // GROUP, GROUP])
        scale = tl.math.div_rn(tl.maximum(tl.max(tl.abs(v), axis=2), _RANGE_FLOOR), QMAX)
        mult = tl.minimum(tl.maximum(tl.math.ceil(tl.math.div_rn(scale, unit[:, None])), 1.0),
                          LEVELS)
        code = _rne(tl.math.div_rn(v, (unit[:, None] * mult)[:, :, None]))
        code = tl.minimum(tl.maximum(code, QMIN), QMAX)
        a = tl.reshape(code * mult[:, :, None], [BLOCK_M, BLOCK_K]).to(tl.int8)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        tl.store(a_ptr + rows[:, None] * K + cols[None, :], a, mask=mask)
        if R > 0:
            acc = _lowrank_step(acc, xs, l1_ptr, cols, K, R, IEEE)
    if R > 0:
        tl.store(xl1_ptr + rows[:, None] * R + tl.arange(0, R)[None, :], acc,
                 mask=rows[:, None] < M)


@triton.jit
def _act_token_kernel(x_ptr, smooth_ptr, l1_ptr, a_ptr, scale_ptr, zp_ptr, xl1_ptr, M, K,
                      stride_xm, HAS_SMOOTH: tl.constexpr, R: tl.constexpr, IEEE: tl.constexpr,
                      MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One scale per token. MODE 0: symmetric int8; 1: asymmetric int8, stored as code - 128 with
    zero point - 128 (the GEMM corrects with W's column sums); 2: FP8 E4M3."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    hi = tl.zeros([BLOCK_M], tl.float32)
    lo = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        v = _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH).to(tl.float32)
        if MODE == 1:
            valid = cols[None, :] < K
            hi = tl.maximum(hi, tl.max(tl.where(valid, v, -float("inf")), axis=1))
            lo = tl.minimum(lo, tl.min(tl.where(valid, v, float("inf")), axis=1))
        else:
            hi = tl.maximum(hi, tl.max(tl.abs(v), axis=1))
    if MODE == 1:
        # the range holds 0 (hi, lo start there), so 0 stays exact
        scale = tl.math.div_rn(tl.maximum(hi - lo, _RANGE_FLOOR), 255.0)
        zp = tl.minimum(tl.maximum(_rne(tl.math.div_rn(-lo, scale)), 0.0), 255.0)
        tl.store(zp_ptr + rows, zp - 128.0, mask=rows < M)
    elif MODE == 2:
        scale = tl.math.div_rn(tl.maximum(hi, _RANGE_FLOOR), 448.0)
    else:
        scale = tl.math.div_rn(tl.maximum(hi, _RANGE_FLOOR), 127.0)
    tl.store(scale_ptr + rows, scale, mask=rows < M)

    acc = tl.zeros([BLOCK_M, R if R > 0 else 16], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xs = _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH)
        v = tl.math.div_rn(xs.to(tl.float32), scale[:, None])
        if MODE == 1:
            a = (tl.minimum(tl.maximum(_rne(v + zp[:, None]), 0.0), 255.0) - 128.0).to(tl.int8)
        elif MODE == 2:
            a = tl.minimum(tl.maximum(v, -448.0), 448.0).to(tl.float8e4nv)
        else:
            a = tl.minimum(tl.maximum(_rne(v), -128.0), 127.0).to(tl.int8)
        mask = (rows[:, None] < M) & (cols[None, :] < K)
        tl.store(a_ptr + rows[:, None] * K + cols[None, :], a, mask=mask)
        if R > 0:
            acc = _lowrank_step(acc, xs, l1_ptr, cols, K, R, IEEE)
    if R > 0:
        tl.store(xl1_ptr + rows[:, None] * R + tl.arange(0, R)[None, :], acc,
                 mask=rows[:, None] < M)


TOKEN_MODES = {"int8": 0, "int8-asym": 1, "e4m3": 2}
ACT_CONFIG = dict(BLOCK_M=16, BLOCK_K=256, num_warps=4)


def _prepare(x: torch.Tensor, smooth, l1):
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    r = 0 if l1 is None else l1.shape[1]
    if r and (r % 16 or l1.shape[0] != k or not l1.is_contiguous()):
        raise ValueError(f"the low-rank factor must be contiguous [K={k}, R] with R a multiple of "
                         f"16, got {tuple(l1.shape)}")
    xl1 = torch.empty(m, r, device=x.device, dtype=torch.float32) if r else None
    dummy = x.new_empty(0)
    return x, m, k, r, xl1, (smooth if smooth is not None else dummy), (l1 if r else dummy)


def act_quant_group(x: torch.Tensor, smooth: torch.Tensor | None, l1: torch.Tensor | None, *,
                    group: int = 64, levels: int = 16, bits: int = 4, config: dict | None = None):
    """x [M, K] -> (a int8 [M, K] = code * multiplier, unit fp32 [M], xl1 fp32 [M, R] or None)."""
    x, m, k, r, xl1, smooth_arg, l1_arg = _prepare(x, smooth, l1)
    a = torch.empty(m, k, device=x.device, dtype=torch.int8)
    unit = torch.empty(m, device=x.device, dtype=torch.float32)
    cfg = dict(config or ACT_CONFIG)
    cfg["BLOCK_K"] = max(group, cfg["BLOCK_K"] // group * group)
    _act_group_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        x, smooth_arg, l1_arg, a, unit, xl1 if r else a, m, k, x.stride(0),
        HAS_SMOOTH=smooth is not None, R=r, IEEE=x.dtype == torch.float32, GROUP=group,
        LEVELS=levels, QMIN=float(-(2 ** (bits - 1))), QMAX=float(2 ** (bits - 1) - 1), **cfg)
    return a, unit, xl1


def act_quant_token(x: torch.Tensor, smooth: torch.Tensor | None, l1: torch.Tensor | None, *,
                    mode: str, config: dict | None = None):
    """x [M, K] -> (a [M, K] int8 or float8_e4m3fn, scale fp32 [M], zero point fp32 [M] minus 128
    (mode "int8-asym") or None, xl1 fp32 [M, R] or None)."""
    x, m, k, r, xl1, smooth_arg, l1_arg = _prepare(x, smooth, l1)
    dtype = torch.float8_e4m3fn if mode == "e4m3" else torch.int8
    a = torch.empty(m, k, device=x.device, dtype=dtype)
    scale = torch.empty(m, device=x.device, dtype=torch.float32)
    zp = torch.empty(m, device=x.device, dtype=torch.float32) if mode == "int8-asym" else None
    cfg = dict(config or ACT_CONFIG)
    _act_token_kernel[(triton.cdiv(m, cfg["BLOCK_M"]),)](
        x, smooth_arg, l1_arg, a, scale, zp if zp is not None else scale, xl1 if r else scale,
        m, k, x.stride(0), HAS_SMOOTH=smooth is not None, R=r, IEEE=x.dtype == torch.float32,
        MODE=TOKEN_MODES[mode], **cfg)
    return a, scale, zp, xl1
