"""NVFP4 on CUDA: quantization of activations and dequantization of stored weights. E2M1 codes in
blocks of 16 along K, one E4M3 scale a block, one fp32 scale for the whole tensor (vqz.formats'
BlockFormat, operation for operation).

The tensor scale needs the largest |x| of the whole input, so it comes first (one reduction over x,
`torch.aminmax`); then every [BLOCK_M, BLOCK_K] tile is independent: one read of x gives its block
scales, codes and, for fake quantization, the dequantized values. No atomics, bitwise identical run
to run. Hopper has no FP4 tensor cores and NVFP4's block scales cannot be folded into an integer
GEMM (BENCHMARKS.md), so the product runs in 16 bits on these values.

Rounding is done on exact fp32 values scaled by powers of two: `_rne` rounds half to even, divisions
are correctly rounded (`div_rn`), fp fusion is off.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqz.formats import NVFP4

from .act_quant import _rne

BLOCK = 16  # NVFP4's block along K
E4M3_MAX = tl.constexpr(448.0)
E2M1_MAX = tl.constexpr(6.0)


@triton.jit
def _pow2(e):
    """2^e as fp32 for int32 e in [-126, 127], from its exponent bits."""
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _exponent(v):
    """floor(log2 v) for a normal fp32 v > 0 (-127 for 0)."""
    return ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127


@triton.jit
def _e4m3(v):
    """v >= 0 rounded to E4M3 (3 mantissa bits, subnormals below 2^-6, saturating at 448):
    (value, code)."""
    e = tl.maximum(_exponent(v), -6)
    r = tl.minimum(_rne(v * _pow2(3 - e)) * _pow2(e - 3), E4M3_MAX)
    er = _exponent(r)
    normal = ((er + 7) << 3) | (r * _pow2(3 - er) - 8.0).to(tl.int32)
    return r, tl.where(er >= -6, normal, (r * 512.0).to(tl.int32))


@triton.jit
def _e2m1(y):
    """y rounded to E2M1 (0, 0.5, 1, 1.5, 2, 3, 4, 6, saturating; the sign kept, -0.0 included):
    (value, code)."""
    a = tl.abs(y)
    e = tl.minimum(tl.maximum(_exponent(a), 0), 2)
    r = tl.minimum(_rne(a * _pow2(1 - e)) * _pow2(e - 1), E2M1_MAX)
    er = _exponent(r)
    magnitude = tl.where(r < 1.0, (r * 2.0).to(tl.int32),
                         ((er + 1) << 1) | ((r * _pow2(-er) - 1.0) * 2.0).to(tl.int32))
    sign = (y.to(tl.int32, bitcast=True) >> 31) & 1
    return tl.where(sign == 1, -r, r), magnitude | (sign << 3)


@triton.jit
def _nvfp4_kernel(x_ptr, ts_ptr, out_ptr, codes_ptr, scales_ptr, M, K, G,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, VALUES: tl.constexpr):
    """VALUES: write the dequantized values to out; else the codes and block scale codes."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    inside = (rm[:, None] < M) & (rk[None, :] < K)
    x = tl.load(x_ptr + rm[:, None] * K + rk[None, :], mask=inside, other=0.0).to(tl.float32)
    ts = tl.load(ts_ptr)
    blocks = tl.reshape(x, [BLOCK_M, BLOCK_K // 16, 16])
    amax = tl.max(tl.abs(blocks), axis=2)
    scale, scale_code = _e4m3(tl.math.div_rn(tl.math.div_rn(amax, E2M1_MAX), ts))
    s = (scale * ts)[:, :, None]
    value, code = _e2m1(tl.where(s > 0, tl.math.div_rn(blocks, tl.where(s > 0, s, 1.0)), 0.0))
    if VALUES:
        out = tl.reshape(value * s, [BLOCK_M, BLOCK_K])
        tl.store(out_ptr + rm[:, None] * K + rk[None, :], out.to(out_ptr.dtype.element_ty),
                 mask=inside)
    else:
        tl.store(codes_ptr + rm[:, None] * K + rk[None, :],
                 tl.reshape(code, [BLOCK_M, BLOCK_K]).to(tl.uint8), mask=inside)
        rg = tl.program_id(1) * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
        tl.store(scales_ptr + rm[:, None] * G + rg[None, :], scale_code.to(tl.uint8),
                 mask=(rm[:, None] < M) & (rg[None, :] < G))


NVFP4_CONFIG = dict(BLOCK_M=16, BLOCK_K=128, num_warps=4)


def _launch(x: torch.Tensor, values: bool, config: dict | None = None):
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m, k = x2.shape
    g = triton.cdiv(k, BLOCK)
    lo, hi = torch.aminmax(x2) if x2.numel() else (x2.new_zeros(()), x2.new_zeros(()))
    ts = NVFP4.tensor_scale_of(torch.maximum(hi, -lo).float())
    out = torch.empty_like(x2) if values else x2
    codes = x2 if values else torch.empty(m, k, device=x.device, dtype=torch.uint8)
    scales = x2 if values else torch.empty(m, g, device=x.device, dtype=torch.uint8)
    cfg = dict(config or NVFP4_CONFIG)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]), triton.cdiv(k, cfg["BLOCK_K"]))
    if m and k:
        _nvfp4_kernel[grid](x2, ts.reshape(1), out, codes, scales, m, k, g, VALUES=values,
                            enable_fp_fusion=False, **cfg)
    if values:
        return out.reshape(x.shape)
    return codes.reshape(x.shape), scales.reshape(*x.shape[:-1], g), ts


def nvfp4_quantize(x: torch.Tensor, config: dict | None = None):
    """x [..., K] 16- or 32-bit -> (codes uint8 [..., K], block scale codes uint8 [..., ceil(K/16)],
    tensor scale fp32 0-dim): NVFP4.encode(x)."""
    return _launch(x, values=False, config=config)


def nvfp4_round(x: torch.Tensor, config: dict | None = None) -> torch.Tensor:
    """NVFP4.round(x): x quantized to NVFP4 and back, in x's dtype."""
    return _launch(x, values=True, config=config)


@triton.jit
def _e2m1_value(code):
    """E2M1 code (int32, sign in bit 3) -> fp32 value."""
    mag = code & 7
    normal = _pow2((mag >> 1) - 1) * (1.0 + (mag & 1).to(tl.float32) * 0.5)
    value = tl.where(mag < 2, mag.to(tl.float32) * 0.5, normal)
    return tl.where((code & 8) != 0, -value, value)


@triton.jit
def _e4m3_value(code):
    """E4M3 code (int32, positive, finite) -> fp32 value."""
    e = (code >> 3) & 15
    m = (code & 7).to(tl.float32)
    return tl.where(e == 0, m * 0.001953125, _pow2(e - 7) * (1.0 + m * 0.125))


@triton.jit
def _decode_kernel(p_ptr, scales_ptr, ts_ptr, out_ptr, N, K, KH, G, BLOCK_N: tl.constexpr,
                   BLOCK_G: tl.constexpr):
    """[BLOCK_N rows, BLOCK_G blocks of 16] of a packed weight -> values, stored interleaved
    (the low nibble is the even column)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rg = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    kh = rg[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    rows = rn[:, None, None]
    p = tl.load(p_ptr + rows * KH + kh, mask=(rows < N) & (kh < KH), other=0).to(tl.int32)
    inside = (rn[:, None] < N) & (rg[None, :] < G)
    s = _e4m3_value(tl.load(scales_ptr + rn[:, None] * G + rg[None, :], mask=inside,
                            other=0).to(tl.int32)) * tl.load(ts_ptr)
    values = tl.join(_e2m1_value(p & 15), _e2m1_value(p >> 4)) * s[:, :, None, None]
    cols = (2 * kh)[:, :, :, None] + tl.arange(0, 2)[None, None, None, :]
    tl.store(out_ptr + rows[:, :, :, None] * K + cols, values.to(out_ptr.dtype.element_ty),
             mask=(rows[:, :, :, None] < N) & (cols < K))


DECODE_CONFIG = dict(BLOCK_N=4, BLOCK_G=16, num_warps=4)


def nvfp4_decode(packed: torch.Tensor, scales: torch.Tensor, tensor_scale: torch.Tensor, k: int,
                 dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """A stored NVFP4 weight (packed codes uint8 [N, ceil(K/2)], block scale codes uint8 [N, G],
    tensor scale fp32 0-dim) -> values [N, K] in `dtype`: NVFP4.decode, unpacked."""
    n, kh = packed.shape
    g = scales.shape[1]
    out = torch.empty(n, k, device=packed.device, dtype=dtype)
    cfg = dict(config or DECODE_CONFIG)
    if n and k:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(g, cfg["BLOCK_G"]))
        _decode_kernel[grid](packed, scales, tensor_scale.reshape(1).float(), out, n, k, kh, g,
                             enable_fp_fusion=False, **cfg)
    return out
