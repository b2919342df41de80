"""Activation kernels: one pass of quantization over a 16-bit input x [M, K], per row block.

Each program owns BLOCK_M rows. It reads them twice, back to back (the second read comes from L2):
once for the row range, once to write the int8 operand of the GEMM. No atomics: every output has one
writer, so the results are bitwise identical run to run. The arithmetic is the quantizer's,
operation for operation: scales are ranges times the reciprocal of the largest code, values are
multiplied by the reciprocal of their scale (one correctly rounded division per scale, none per
element), rounding is half-to-even, and fp fusion is off (no FMA contraction), so codes match vqz's
pure-torch quantizer exactly (kernels/reference.py).

The low-rank branch's down-projection is not computed here: as an MMA inside this kernel it cost
2.4-4x the kernel itself on Hopper (FLUX qkv at 1024²: 62-84 us against 26 us), while cuBLAS does
x (λ⁻¹ L1) in 10 us (kernels/runtime.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from vqz.nn.rotation import ROTATION_BLOCK

_RANGE_FLOOR = tl.constexpr(1e-8)  # the quantizer's smallest range (vqz/quantizer.py)
_ROUND_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2^23: (v + magic) - magic rounds fp32 |v| < 2^22 half-to-even


@triton.jit
def _rne(v):
    return (v + _ROUND_MAGIC) - _ROUND_MAGIC


@triton.jit
def _butterfly(v, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, H: tl.constexpr):
    """One stage of the Walsh–Hadamard transform: (a, b) -> (a + b, a - b) for columns H apart."""
    v = tl.reshape(v, [BLOCK_M, BLOCK_K // (2 * H), 2, H])
    a, b = tl.split(tl.permute(v, (0, 1, 3, 2)))
    v = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
    return tl.reshape(v, [BLOCK_M, BLOCK_K])


@triton.jit
def _hadamard64(x, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x [BM, BK] times the block Hadamard matrix (blocks of 64, BK a multiple of 64), stage for
    stage as vqz/nn/rotation.py computes it, returned in x's dtype."""
    v = x.to(tl.float32)
    v = _butterfly(v, BLOCK_M, BLOCK_K, 1)
    v = _butterfly(v, BLOCK_M, BLOCK_K, 2)
    v = _butterfly(v, BLOCK_M, BLOCK_K, 4)
    v = _butterfly(v, BLOCK_M, BLOCK_K, 8)
    v = _butterfly(v, BLOCK_M, BLOCK_K, 16)
    v = _butterfly(v, BLOCK_M, BLOCK_K, 32)
    return (v * 0.125).to(x.dtype)


@triton.jit
def _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH: tl.constexpr,
                   ROTATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """x[rows, cols] / λ[cols] in x's dtype (zeros outside the matrix), times the block Hadamard
    matrix with ROTATE."""
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    if HAS_SMOOTH:
        lam = tl.load(smooth_ptr + cols, mask=cols < K, other=1.0).to(tl.float32)
        inv = tl.math.div_rn(1.0, lam)
        x = (x.to(tl.float32) * inv[None, :]).to(x.dtype)
    if ROTATE:
        x = _hadamard64(x, BLOCK_M, BLOCK_K)
    return x


@triton.jit
def _store_codes(a_ptr, a, rows, cols, M, K):
    tl.store(a_ptr + rows[:, None] * K + cols[None, :], a,
             mask=(rows[:, None] < M) & (cols[None, :] < K))


@triton.jit
def _row_range(x_ptr, smooth_ptr, rows, k_start, k_end, M, K, stride_xm, HAS_SMOOTH: tl.constexpr,
               ROTATE: tl.constexpr, SIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """max|x/λ| of each row over columns [k_start, k_end) (SIGNED: max and min, both ranges
    holding 0)."""
    hi = tl.zeros([BLOCK_M], tl.float32)
    lo = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        v = _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH, ROTATE,
                           BLOCK_M, BLOCK_K).to(tl.float32)
        if SIGNED:
            valid = cols[None, :] < K
            hi = tl.maximum(hi, tl.max(tl.where(valid, v, -float("inf")), axis=1))
            lo = tl.minimum(lo, tl.min(tl.where(valid, v, float("inf")), axis=1))
        else:
            hi = tl.maximum(hi, tl.max(tl.abs(v), axis=1))
    return hi, lo


@triton.jit
def _row_range_kernel(x_ptr, smooth_ptr, hi_ptr, lo_ptr, M, K, stride_xm, HAS_SMOOTH: tl.constexpr,
                      ROTATE: tl.constexpr, SIGNED: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per row and K chunk: the row range of _row_range -> [chunks, M]."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = tl.program_id(1)
    hi, lo = _row_range(x_ptr, smooth_ptr, rows, chunk * CHUNK,
                        tl.minimum(chunk * CHUNK + CHUNK, K), M, K, stride_xm, HAS_SMOOTH, ROTATE,
                        SIGNED, BLOCK_M, BLOCK_K)
    tl.store(hi_ptr + chunk * M + rows, hi, mask=rows < M)
    if SIGNED:
        tl.store(lo_ptr + chunk * M + rows, lo, mask=rows < M)


@triton.jit
def _gather_range(part_ptr, rows, M, CHUNKS, CHUNKS_P2: tl.constexpr, SIGN: tl.constexpr):
    """The whole-row max (SIGN 1) or min (SIGN -1) from the per-chunk partials [chunks, M]."""
    c = tl.arange(0, CHUNKS_P2)
    part = tl.load(part_ptr + c[None, :] * M + rows[:, None],
                   mask=(c[None, :] < CHUNKS) & (rows[:, None] < M), other=0.0)
    if SIGN > 0:
        return tl.max(part, axis=1)
    return tl.min(part, axis=1)


@triton.jit
def _act_group_kernel(x_ptr, smooth_ptr, hi_ptr, a_ptr, unit_ptr, M, K, stride_xm, CHUNKS,
                      HAS_SMOOTH: tl.constexpr, ROTATE: tl.constexpr, GROUP: tl.constexpr,
                      LEVELS: tl.constexpr,
                      QMIN: tl.constexpr, QMAX: tl.constexpr, INLINE: tl.constexpr,
                      CHUNK: tl.constexpr,
                      CHUNKS_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Symmetric INT codes per token per group with two-level scales, for one K chunk of a row
    block: a = code * multiplier (int8), unit [M] fp32 (chunk 0 writes it). INLINE: one chunk,
    whose program finds the row range itself (no _row_range_kernel launch)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = tl.program_id(1)
    if INLINE:
        amax, _ = _row_range(x_ptr, smooth_ptr, rows, 0, K, M, K, stride_xm, HAS_SMOOTH, ROTATE,
                             False, BLOCK_M, BLOCK_K)
    else:
        amax = _gather_range(hi_ptr, rows, M, CHUNKS, CHUNKS_P2, 1)
    unit = tl.math.div_rn(tl.maximum(amax, _RANGE_FLOOR) * (1.0 / QMAX), LEVELS)
    if chunk == 0:
        tl.store(unit_ptr + rows, unit, mask=rows < M)

    for k0 in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, K), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xs = _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH, ROTATE,
                            BLOCK_M, BLOCK_K)
        v = tl.reshape(xs.to(tl.float32), [BLOCK_M, BLOCK_K // GROUP, GROUP])
        scale = tl.maximum(tl.max(tl.abs(v), axis=2), _RANGE_FLOOR) * (1.0 / QMAX)
        mult = tl.minimum(tl.maximum(tl.math.ceil(tl.math.div_rn(scale, unit[:, None])), 1.0),
                          LEVELS)
        code = _rne(v * tl.math.div_rn(1.0, unit[:, None] * mult)[:, :, None])
        code = tl.minimum(tl.maximum(code, QMIN), QMAX)
        a = tl.reshape(code * mult[:, :, None], [BLOCK_M, BLOCK_K]).to(tl.int8)
        _store_codes(a_ptr, a, rows, cols, M, K)


@triton.jit
def _act_token_kernel(x_ptr, smooth_ptr, hi_ptr, lo_ptr, a_ptr, scale_ptr, zp_ptr, M, K, stride_xm,
                      CHUNKS, HAS_SMOOTH: tl.constexpr, ROTATE: tl.constexpr, MODE: tl.constexpr,
                      INLINE: tl.constexpr, CHUNK: tl.constexpr,
                      CHUNKS_P2: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """One scale per token, for one K chunk of a row block. MODE 0: symmetric int8; 1: asymmetric
    int8, stored as code - 128 with zero point - 128 (the GEMM corrects with W's column sums);
    2: FP8 E4M3. INLINE as in _act_group_kernel."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    chunk = tl.program_id(1)
    if INLINE:
        hi, lo = _row_range(x_ptr, smooth_ptr, rows, 0, K, M, K, stride_xm, HAS_SMOOTH, ROTATE,
                            MODE == 1, BLOCK_M, BLOCK_K)
    else:
        hi = _gather_range(hi_ptr, rows, M, CHUNKS, CHUNKS_P2, 1)
        lo = hi
        if MODE == 1:
            lo = _gather_range(lo_ptr, rows, M, CHUNKS, CHUNKS_P2, -1)
    if MODE == 1:
        scale = tl.maximum(hi - lo, _RANGE_FLOOR) * (1.0 / 255.0)
        zp = tl.minimum(tl.maximum(_rne(tl.math.div_rn(-lo, scale)), 0.0), 255.0)
        if chunk == 0:
            tl.store(zp_ptr + rows, zp - 128.0, mask=rows < M)
    elif MODE == 2:
        scale = tl.maximum(hi, _RANGE_FLOOR) * (1.0 / 448.0)
    else:
        scale = tl.maximum(hi, _RANGE_FLOOR) * (1.0 / 127.0)
    if chunk == 0:
        tl.store(scale_ptr + rows, scale, mask=rows < M)

    for k0 in range(chunk * CHUNK, tl.minimum(chunk * CHUNK + CHUNK, K), BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        xs = _load_smoothed(x_ptr, smooth_ptr, rows, cols, M, K, stride_xm, HAS_SMOOTH, ROTATE,
                            BLOCK_M, BLOCK_K)
        v = xs.to(tl.float32) * tl.math.div_rn(1.0, scale)[:, None]
        if MODE == 1:
            a = (tl.minimum(tl.maximum(_rne(v + zp[:, None]), 0.0), 255.0) - 128.0).to(tl.int8)
        elif MODE == 2:
            a = tl.minimum(tl.maximum(v, -448.0), 448.0).to(tl.float8e4nv)
        else:
            a = tl.minimum(tl.maximum(_rne(v), -128.0), 127.0).to(tl.int8)
        _store_codes(a_ptr, a, rows, cols, M, K)


TOKEN_MODES = {"int8": 0, "int8-asym": 1, "e4m3": 2}
# Rows per program, columns per loop step, and columns per program: row blocks are split along K so
# that thousands of programs keep enough loads in flight (one program per row block ran at 0.3 TB/s).
ACT_CONFIG = dict(BLOCK_M=32, BLOCK_K=128, CHUNK=512, num_warps=4)  # best on H100 across K
# Up to K = 4096 one launch does as well: each program finds its 4 rows' range itself, then reads
# them again from L2 (H200: 25 us against 26 at 4608x3072, 9 against 10 at 1024x3072; 97 against
# 90 at K = 12288), and an eager call saves a launch (samples/kernel_sweep.py --act-only).
INLINE_CONFIG = dict(BLOCK_M=4, BLOCK_K=1024, CHUNK=0, num_warps=4, INLINE=True)
INLINE_MAX_K = 4096


class _Launch:
    """Shapes, outputs and the row-range pass (unless INLINE) shared by the two activation
    kernels."""

    def __init__(self, x, smooth, config, signed, rotate, granule=1):
        if x.stride(-1) != 1:
            x = x.contiguous()
        self.x, self.smooth, self.rotate = x, smooth, rotate
        self.m, self.k = m, k = x.shape
        if rotate:
            if k % ROTATION_BLOCK:
                raise ValueError(f"the rotation works on blocks of {ROTATION_BLOCK} channels; K = {k}")
            granule = max(granule, ROTATION_BLOCK)  # a tile holds whole blocks
        cfg = dict(config or (INLINE_CONFIG if k <= INLINE_MAX_K else ACT_CONFIG))
        cfg.setdefault("INLINE", False)
        cfg["BLOCK_K"] = max(granule, cfg["BLOCK_K"] // granule * granule)
        if cfg["INLINE"]:  # one chunk: the whole row
            cfg["CHUNK"] = triton.cdiv(k, cfg["BLOCK_K"]) * cfg["BLOCK_K"]
        else:
            cfg["CHUNK"] = max(cfg["BLOCK_K"], cfg["CHUNK"] // cfg["BLOCK_K"] * cfg["BLOCK_K"])
        self.cfg = cfg
        self.chunks = triton.cdiv(k, cfg["CHUNK"])
        self.grid = (triton.cdiv(m, cfg["BLOCK_M"]), self.chunks)
        self.dummy = x.new_empty(0)
        if cfg["INLINE"]:
            self.hi = self.lo = self.dummy
            return
        self.hi = x.new_empty(self.chunks, m, dtype=torch.float32)
        self.lo = x.new_empty(self.chunks, m, dtype=torch.float32) if signed else self.hi
        _row_range_kernel[self.grid](
            x, self.smooth_arg, self.hi, self.lo, m, k, x.stride(0),
            HAS_SMOOTH=smooth is not None, ROTATE=rotate, SIGNED=signed, CHUNK=cfg["CHUNK"],
            BLOCK_M=cfg["BLOCK_M"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"],
            enable_fp_fusion=False)

    @property
    def smooth_arg(self):
        return self.smooth if self.smooth is not None else self.dummy

    def common(self) -> dict:
        return dict(HAS_SMOOTH=self.smooth is not None, ROTATE=self.rotate,
                    CHUNKS_P2=triton.next_power_of_2(self.chunks),
                    enable_fp_fusion=False, **self.cfg)


def act_quant_group(x: torch.Tensor, smooth: torch.Tensor | None, *, group: int = 64,
                    levels: int = 16, bits: int = 4, rotate: bool = False,
                    config: dict | None = None):
    """x [M, K] -> (a int8 [M, K] = code * multiplier, unit fp32 [M]); `rotate`: x / λ is first
    multiplied by the block Hadamard matrix (vqz/nn/rotation.py)."""
    run = _Launch(x, smooth, config, signed=False, rotate=rotate, granule=group)
    a = torch.empty(run.m, run.k, device=x.device, dtype=torch.int8)
    unit = torch.empty(run.m, device=x.device, dtype=torch.float32)
    _act_group_kernel[run.grid](
        run.x, run.smooth_arg, run.hi, a, unit, run.m, run.k, run.x.stride(0), run.chunks,
        GROUP=group, LEVELS=levels, QMIN=float(-(2 ** (bits - 1))), QMAX=float(2 ** (bits - 1) - 1),
        **run.common())
    return a, unit


def act_quant_token(x: torch.Tensor, smooth: torch.Tensor | None, *, mode: str,
                    rotate: bool = False, config: dict | None = None):
    """x [M, K] -> (a [M, K] int8 or float8_e4m3fn, scale fp32 [M], zero point fp32 [M] minus 128
    (mode "int8-asym") or None); `rotate` as in act_quant_group."""
    run = _Launch(x, smooth, config, signed=mode == "int8-asym", rotate=rotate)
    dtype = torch.float8_e4m3fn if mode == "e4m3" else torch.int8
    a = torch.empty(run.m, run.k, device=x.device, dtype=dtype)
    scale = torch.empty(run.m, device=x.device, dtype=torch.float32)
    zp = torch.empty(run.m, device=x.device, dtype=torch.float32) if mode == "int8-asym" else None
    _act_token_kernel[run.grid](
        run.x, run.smooth_arg, run.hi, run.lo, a, scale, zp if zp is not None else scale, run.m,
        run.k, run.x.stride(0), run.chunks, MODE=TOKEN_MODES[mode], **run.common())
    return a, scale, zp
