"""Kernels that read 4-bit weights ([N, ceil(K/2)] uint8 packed codes, the even index of K in the low
nibble, two's complement; W4A16 reads them reordered).

- `unpack_int4`: packed codes and integer group multipliers -> int8 `code * multiplier` [N, K]. The
  memory layout of W4A4 keeps only the packed weights resident and unpacks each layer into a
  transient workspace right before the INT8 GEMM (on Hopper, unpacking inside the GEMM's K loop ran
  at 0.45-0.64x of BF16; a separate pass costs one read of 4-bit and one write of 8-bit weights).
- `w4a16_gemm`: y = x Wᵀ with W = code * fp32 group scale, for few tokens (M <= 64), where the layer
  is memory-bound. It reads the same 4-bit codes reordered at load (reference.w4a16_words) so that
  each thread's 16-byte load is its MMA operand, and turns eight codes into 16-bit floats with
  four bit operations and four exact FMAs (two values each) instead of eight int-to-float
  conversions. Split-K partials are added in a fixed order by the last split of each tile.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .reference import W4A16_ROWS


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


def _words_to_pairs_asm(one: int, magic: int, bias: int, fma: str) -> str:
    """PTX: one int32 word -> its 8 signed nibbles as 16-bit floats, in w4a16_words' output order
    (nibbles 0, 4, 1, 5, 2, 6, 3, 7). (nibble ^ 8) | exponent bits is magic + the offset-binary
    code, so one lop3 and one exact fma (x * 1 - magic - 8) make two values at a time."""
    return f"""
{{
    .reg .b32 s4, s8, s12, p0, p1, p2, p3, one, bias;
    mov.b32 one, {one:#x};
    mov.b32 bias, {bias:#x};
    shr.b32 s4, $8, 4;
    shr.b32 s8, $8, 8;
    shr.b32 s12, $8, 12;
    lop3.b32 p0, $8, 0x000F000F, {magic:#x}, 0x6A;
    lop3.b32 p1, s4, 0x000F000F, {magic:#x}, 0x6A;
    lop3.b32 p2, s8, 0x000F000F, {magic:#x}, 0x6A;
    lop3.b32 p3, s12, 0x000F000F, {magic:#x}, 0x6A;
    {fma} p0, p0, one, bias;
    {fma} p1, p1, one, bias;
    {fma} p2, p2, one, bias;
    {fma} p3, p3, one, bias;
    mov.b32 {{$0, $1}}, p0;
    mov.b32 {{$2, $3}}, p1;
    mov.b32 {{$4, $5}}, p2;
    mov.b32 {{$6, $7}}, p3;
}}"""


# bfloat16: 0x4308 is 136 (128 + 8); float16: 0x6408 is 1032 (1024 + 8); each twice, for two values.
_BF16_PAIRS = tl.constexpr(_words_to_pairs_asm(0x3F803F80, 0x43084308, 0xC308C308, "fma.rn.bf16x2"))
_FP16_PAIRS = tl.constexpr(_words_to_pairs_asm(0x3C003C00, 0x64086408, 0xE408E408, "fma.rn.f16x2"))


@triton.jit
def _nibble(w, i: tl.constexpr, dtype: tl.constexpr):
    return ((((w >> (4 * i)) & 0xF) ^ 8) - 8).to(dtype)


@triton.jit
def _words_to_codes(w, dtype: tl.constexpr, ASM: tl.constexpr):
    """int32 words [R, C] -> 8 tensors [R, C] of their codes in `dtype`, w4a16_words' order."""
    if ASM:
        if dtype == tl.bfloat16:
            return tl.inline_asm_elementwise(_BF16_PAIRS, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w],
                                             dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(_FP16_PAIRS, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        return (_nibble(w, 0, dtype), _nibble(w, 4, dtype), _nibble(w, 1, dtype),
                _nibble(w, 5, dtype), _nibble(w, 2, dtype), _nibble(w, 6, dtype),
                _nibble(w, 3, dtype), _nibble(w, 7, dtype))


@triton.jit
def _w4a16_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, part_ptr, count_ptr, M, N, K, G,
                  stride_xm, K_PER_SPLIT, GROUP: tl.constexpr, SPLITS: tl.constexpr,
                  HAS_BIAS: tl.constexpr, ASM: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """yᵀ tile [BLOCK_N, BLOCK_M] = sum over this split's groups g of s[n, g] * (codes[n, g] .
    x[m, g]), the weights as the MMA's first operand. Each program's word tile of a group is
    contiguous (w4a16_words' layout, BLOCK_N = its rows) and is reshaped into the operand in
    registers, a renaming: no data moves. With SPLITS > 1 each program writes its fp32 partial,
    and the last of a tile's splits to finish (a counter, reset after) adds them in split order:
    deterministic, one launch. Rows past N (the layout's padding) read wrapped scales and are not
    stored."""
    pid_n, pid_m, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    bn = rn % N
    rk = tl.arange(0, GROUP)
    tile = w_ptr + (pid_n * G * BLOCK_N + tl.arange(0, BLOCK_N)[:, None]) * (GROUP // 8) \
        + tl.arange(0, GROUP // 8)[None, :]
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    k_start = split * K_PER_SPLIT
    for k0 in range(k_start, tl.minimum(k_start + K_PER_SPLIT, K), GROUP):
        w = tl.load(tile + (k0 // GROUP) * BLOCK_N * (GROUP // 8))
        c0, c1, c2, c3, c4, c5, c6, c7 = _words_to_codes(w, x_ptr.dtype.element_ty, ASM)
        a = tl.join(tl.join(tl.join(c0, c1), tl.join(c2, c3)),
                    tl.join(tl.join(c4, c5), tl.join(c6, c7)))  # [BN, words, j0, j1, j2]
        a = tl.reshape(a, [BLOCK_N, 4, GROUP // 32, 2, 2, 2])  # words = (c, t)
        a = tl.reshape(tl.permute(a, (0, 2, 5, 4, 1, 3)), [BLOCK_N, GROUP])
        xt = tl.load(x_ptr + rm[None, :] * stride_xm + k0 + rk[:, None],
                     mask=(rm[None, :] < M) & (rk[:, None] < K - k0), other=0.0)
        acc += tl.dot(a, xt) * tl.load(s_ptr + bn * G + k0 // GROUP)[:, None]
    mask = (rm[None, :] < M) & (rn[:, None] < N)
    offs = rm[None, :] * N + rn[:, None]
    if SPLITS > 1:
        tl.store(part_ptr + split * M * N + offs, acc, mask=mask)
        tl.debug_barrier()
        count = count_ptr + pid_m * tl.num_programs(0) + pid_n
        last = tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == SPLITS - 1
        if last:
            acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
            for s in range(0, SPLITS):
                acc += tl.load(part_ptr + s * M * N + offs, mask=mask, other=0.0,
                               cache_modifier=".cg")
            tl.store(count, 0)
        mask = mask & last
    if HAS_BIAS:
        acc += tl.load(bias_ptr + bn).to(tl.float32)[:, None]
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# Programs per multiprocessor that split K aims at, warps and pipeline depth (H100 sweep,
# samples/kernel_sweep.py --w4a16); a program's rows are the layout's W4A16_ROWS.
W4A16_CONFIG = dict(WAVES=4, num_warps=4, num_stages=3)
_COUNTERS: dict = {}


def _split_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 counters for the split-K tiles, one buffer per device and stream (the kernel
    leaves them at zero again), so concurrent streams never share one."""
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (device, stream)
    counters = _COUNTERS.get(key)
    if counters is None or counters.numel() < tiles:
        counters = _COUNTERS[key] = torch.zeros(max(tiles, 1024), device=device, dtype=torch.int32)
    return counters


def w4a16_gemm(x: torch.Tensor, words: torch.Tensor, scale: torch.Tensor, k: int, group: int,
               bias: torch.Tensor | None = None, split_k: int | None = None,
               config: dict | None = None) -> torch.Tensor:
    """x [M, K] 16-bit, words in reference.w4a16_words' layout, scale [N, G] fp32 -> y [M, N] in
    x's dtype. K is split over enough programs to fill the GPU (`split_k` forces a number of
    splits)."""
    if group % 32:
        raise ValueError(f"the W4A16 kernel needs a group size divisible by 32, got {group}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = dict(config or W4A16_CONFIG)
    waves = cfg.pop("WAVES")
    m, n = x.shape[0], scale.shape[0]
    groups = triton.cdiv(k, group)
    tiles = triton.cdiv(n, W4A16_ROWS) * triton.cdiv(m, 16)
    if split_k is None:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
        split_k = max(1, min(groups, waves * sms // tiles))
    k_per_split = triton.cdiv(groups, split_k) * group
    split_k = triton.cdiv(k, k_per_split)
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    parts = torch.empty(split_k, m, n, device=x.device, dtype=torch.float32) if split_k > 1 else y
    counters = _split_counters(x.device, tiles)
    has_bias = bias is not None
    # the interpreter runs no inline PTX; 32-bit inputs take the portable conversion as well
    asm = os.environ.get("TRITON_INTERPRET", "0") != "1" and x.dtype in (torch.float16, torch.bfloat16)
    grid = (triton.cdiv(n, W4A16_ROWS), triton.cdiv(m, 16), split_k)
    _w4a16_kernel[grid](x, words, scale, bias if has_bias else scale, y, parts, counters, m, n, k,
                        groups, x.stride(0), k_per_split, GROUP=group, SPLITS=split_k,
                        HAS_BIAS=has_bias, ASM=asm, BLOCK_M=16, BLOCK_N=W4A16_ROWS, **cfg)
    return y
