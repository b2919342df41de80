"""Kernels that read 4-bit weights straight from their packed storage ([N, ceil(K/2)] uint8, the
even index of K in the low nibble, two's complement).

- `unpack_int4`: packed codes and integer group multipliers -> int8 `code * multiplier` [N, K]. The
  memory layout of W4A4 keeps only the packed weights resident and unpacks each layer into a
  transient workspace right before the INT8 GEMM (on Hopper, unpacking inside the GEMM's K loop ran
  at 0.45-0.64x of BF16; a separate pass costs one read of 4-bit and one write of 8-bit weights).
- `w4a16_gemm`: y = x Wᵀ with W = code * fp32 group scale, for few tokens (M <= 64), where the layer
  is memory-bound and unpacking in registers is cheap against the bytes it saves. Split-K partial
  sums go to a workspace and a second pass adds them in a fixed order (deterministic), with the
  bias and the cast to the output dtype.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _unpack_tile(p):
    """uint8 [R, C] -> int32 codes [R, 2C], low nibble first, sign-extended."""
    p = p.to(tl.int32)
    lo = ((p & 0xF) ^ 8) - 8
    hi = ((p >> 4) ^ 8) - 8
    return tl.reshape(tl.join(lo, hi), [p.shape[0], 2 * p.shape[1]])


@triton.jit
def _unpack_kernel(p_ptr, mult_ptr, out_ptr, N, K, KH, G, GROUP: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, PAIRS: tl.constexpr):
    """BLOCK_N rows by BLOCK_G groups, as [rows, groups, bytes of a group] tiles, so each group's
    multiplier is loaded once and broadcast. With PAIRS (K even) the two int8 values of a byte are
    stored as one little-endian int16 into out viewed as [N, K/2] int16: the store keeps the load's
    layout, 16 bytes a thread (an interleaving join stored 2 bytes at a time, at half the speed)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rg = tl.program_id(1) * BLOCK_G + tl.arange(0, BLOCK_G)
    kh = rg[None, :, None] * (GROUP // 2) + tl.arange(0, GROUP // 2)[None, None, :]
    rows = rn[:, None, None]
    inside = (rows < N) & (kh < KH)
    p = tl.load(p_ptr + rows * KH + kh, mask=inside, other=0).to(tl.int32)
    mult = tl.load(mult_ptr + rn[:, None] * G + rg[None, :],
                   mask=(rn[:, None] < N) & (rg[None, :] < G), other=0).to(tl.int32)[:, :, None]
    lo = (((p & 0xF) ^ 8) - 8) * mult
    hi = (((p >> 4) ^ 8) - 8) * mult
    if PAIRS:
        tl.store(out_ptr + rows * KH + kh, ((lo & 0xFF) | (hi << 8)).to(tl.int16), mask=inside)
    else:
        cols = (2 * kh)[:, :, :, None] + tl.arange(0, 2)[None, None, None, :]
        mask = (rows[:, :, :, None] < N) & (cols < K)
        tl.store(out_ptr + rows[:, :, :, None] * K + cols, tl.join(lo, hi).to(tl.int8), mask=mask)


# Rows and groups per program of the unpack (H200 sweep, samples/kernel_sweep.py --unpack).
UNPACK_CONFIG = dict(BLOCK_N=4, BLOCK_G=8, num_warps=4)


def unpack_int4(packed: torch.Tensor, multiplier: torch.Tensor, k: int, group: int,
                out: torch.Tensor | None = None, config: dict | None = None) -> torch.Tensor:
    """packed [N, ceil(K/2)] uint8, multiplier [N, G] uint8 -> int8 [N, K] (into `out` if given)."""
    n, kh = packed.shape
    if out is None:
        out = torch.empty(n, k, device=packed.device, dtype=torch.int8)
    cfg = dict(config or UNPACK_CONFIG)
    groups = multiplier.shape[1]
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(groups, cfg["BLOCK_G"]))
    pairs = k % 2 == 0
    _unpack_kernel[grid](packed, multiplier, out.view(torch.int16) if pairs else out, n, k, kh,
                         groups, GROUP=group, PAIRS=pairs, **cfg)
    return out


@triton.jit
def _w4a16_kernel(x_ptr, p_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, KH, G, stride_xm, K_PER_SPLIT,
                  GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, FINAL: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum over this split's groups g of s[n, g] * (x[m, g] . codes[n, g]): with FINAL (one split)
    y[m, n] plus bias in out's dtype, else the fp32 partial part[split, m, n]."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bn = rn % N
    rk = tl.arange(0, GROUP)
    rkh = tl.arange(0, GROUP // 2)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), GROUP):
        x = tl.load(x_ptr + rm[:, None] * stride_xm + k0 + rk[None, :],
                    mask=(rm[:, None] < M) & (rk[None, :] < K - k0), other=0.0)
        p = tl.load(p_ptr + bn[:, None] * KH + k0 // 2 + rkh[None, :],
                    mask=rkh[None, :] < KH - k0 // 2, other=0)
        w = tl.trans(_unpack_tile(p)).to(x.dtype)  # [GROUP, BLOCK_N], codes exact in 16 bits
        scale = tl.load(s_ptr + bn * G + k0 // GROUP)
        acc += tl.dot(x, w) * scale[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if FINAL:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + bn).to(tl.float32)[None, :]
        tl.store(out_ptr + rm[:, None] * N + rn[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(out_ptr + split * M * N + rm[:, None] * N + rn[None, :], acc, mask=mask)


@triton.jit
def _split_sum_kernel(part_ptr, bias_ptr, y_ptr, MN, N, SPLITS, HAS_BIAS: tl.constexpr,
                      BLOCK: tl.constexpr):
    """y = sum of the partials in split order (deterministic) plus bias, in y's dtype."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], tl.float32)
    for split in range(0, SPLITS):
        acc += tl.load(part_ptr + split * MN + i, mask=i < MN, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + i % N, mask=i < MN, other=0.0).to(tl.float32)
    tl.store(y_ptr + i, acc.to(y_ptr.dtype.element_ty), mask=i < MN)


# Output columns per program and programs per multiprocessor that split K aims at (H200 sweep,
# samples/kernel_sweep.py --w4a16; issuing the loads of 2 or 4 groups per loop step did not help).
W4A16_CONFIG = dict(BLOCK_N=32, WAVES=8, num_warps=4, num_stages=3)


def w4a16_gemm(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, k: int, group: int,
               bias: torch.Tensor | None = None, split_k: int | None = None,
               config: dict | None = None) -> torch.Tensor:
    """x [M, K] 16-bit, packed [N, ceil(K/2)] uint8, scale [N, G] fp32 -> y [M, N] in x's dtype.
    K is split over enough programs to fill the GPU (`split_k` forces a number of splits); with
    one split the kernel writes y itself, else a second pass adds the partials in order."""
    if group % 32:
        raise ValueError(f"the W4A16 kernel needs a group size divisible by 32, got {group}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = dict(config or W4A16_CONFIG)
    block_n, waves = cfg.pop("BLOCK_N"), cfg.pop("WAVES")
    m = x.shape[0]
    n, kh = packed.shape
    groups = triton.cdiv(k, group)
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, 16)
    if split_k is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        split_k = max(1, min(groups, waves * sms // tiles))
    k_per_split = triton.cdiv(groups, split_k) * group
    split_k = triton.cdiv(k, k_per_split)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    final = split_k == 1
    out = y if final else torch.empty(split_k, m, n, device=x.device, dtype=torch.float32)
    has_bias = bias is not None
    bias_arg = bias if has_bias else scale
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, 16), split_k)
    _w4a16_kernel[grid](x, packed, scale, bias_arg, out, m, n, k, kh, scale.shape[1], x.stride(0),
                        k_per_split, GROUP=group, HAS_BIAS=has_bias, FINAL=final, BLOCK_M=16,
                        BLOCK_N=block_n, **cfg)
    if not final:
        block = 1024
        _split_sum_kernel[(triton.cdiv(m * n, block),)](out, bias_arg, y, m * n, n, split_k,
                                                        HAS_BIAS=has_bias, BLOCK=block)
    return y
