"""Pure-torch definitions of what each kernel computes: the CPU path of the custom ops and the oracle
of the kernel tests. Quantization goes through vqz's own Quantizer, so a kernel that matches these
matches the library's fake quantization code for code."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vqz.config import QuantSpec
from vqz.formats import unpack_codes
from vqz.nn.rotation import quantizer_input
from vqz.quantizer import Quantizer


def _per_column(per_group: torch.Tensor, group: int, k: int) -> torch.Tensor:
    """[..., G] values of groups of `group` columns -> [..., K], one per column."""
    return per_group.repeat_interleave(group, -1)[..., :k]


def act_quant_group(x, smooth, *, group=64, levels=16, bits=4, rotate=False):
    """Reference of kernels.act_quant.act_quant_group: (a = code * multiplier, unit)."""
    xs = quantizer_input(x, smooth, rotate)
    spec = QuantSpec(f"int{bits}", "group", group, dynamic=True, int_group_scales=levels)
    q = Quantizer(spec).quantize(xs)
    mult = _per_column(q["group_scale"], group, x.shape[-1])
    a = (q["codes"].to(torch.int32) * mult).to(torch.int8)
    return a, q["scale"].reshape(-1)


def act_quant_token(x, smooth, *, mode, rotate=False):
    """Reference of kernels.act_quant.act_quant_token: (a, scale, zero point - 128 or None)."""
    xs = quantizer_input(x, smooth, rotate)
    fmt = "e4m3" if mode == "e4m3" else "int8"
    q = Quantizer(QuantSpec(fmt, "token", dynamic=True, symmetric=mode != "int8-asym")).quantize(xs)
    zp = None
    if mode == "int8-asym":
        a = (q["codes"].to(torch.int16) - 128).to(torch.int8)
        zp = q["zero_point"].reshape(-1) - 128
    elif mode == "e4m3":
        a = q["codes"].view(torch.float8_e4m3fn)
    else:
        a = q["codes"]
    return a, q["scale"].reshape(-1), zp


# The GEMM epilogue's activations; the custom op and the kernel name them by index in this tuple.
ACTIVATION_NAMES = (None, "gelu_tanh", "gelu", "silu")


def activation(y: torch.Tensor, name: str | None) -> torch.Tensor:
    if name is None:
        return y
    if name == "silu":
        return F.silu(y)
    return F.gelu(y, approximate="tanh" if name == "gelu_tanh" else "none")


def int8_gemm(a, b, scale_a, scale_b, *, zero_point=None, colsum_b=None, xl1=None, l2=None,
              bias=None, activation_name=None, out_dtype=torch.bfloat16):
    """Reference of kernels.int8_gemm.int8_gemm, in the kernel's order of fp32 operations; the
    integer product is exact (float64 holds every sum of int8 products below 2^53), and so are the
    branch's products of 16-bit factors in fp32."""
    y = (a.double() @ b.double().T).float()
    if zero_point is not None:
        y = y - zero_point[:, None] * colsum_b[None, :]
    y = y * (scale_a[:, None] * scale_b[None, :])
    if xl1 is not None:  # the branch in l2's dtype, accumulated in fp32
        y = y + xl1.to(l2.dtype).float() @ l2.float()
    if bias is not None:
        y = y + bias.float()
    return activation(y, activation_name).to(out_dtype)


def unpack_int4(packed, multiplier, k, group):
    """Reference of kernels.int4_weights.unpack_int4: int8 code * multiplier [N, K]."""
    codes = unpack_codes(packed, 4, k, signed=True).to(torch.int32)
    return (codes * _per_column(multiplier, group, k)).to(torch.int8)


# The W4A16 kernel's weight layout: [ceil(N / W4A16_ROWS), G, W4A16_ROWS, group / 8] int32 words,
# each program's tile of rows and one group contiguous (N zero-padded to whole tiles). Per row and
# group (T = group / 32), word c*T + t (c < 4, t < T) holds the codes at k = 32t + 16*j2 + 8*j1 +
# 2c + j0 of the group, code o = 4*j2 + 2*j1 + j0 in nibble _W4A16_SLOTS[o]: one thread of a 16x16
# MMA tile takes exactly the codes (2c, 2c+1) and (2c+8, 2c+9) of a row, so each thread's T words
# are its operand and one 16-byte load (group 128) brings them, and nibbles i and i+4 land in the
# two halves of one 32-bit register.
W4A16_ROWS = 64
_W4A16_SLOTS = (0, 4, 1, 5, 2, 6, 3, 7)


def w4a16_words(packed, k, group):
    """Packed codes [N, ceil(K/2)] uint8 -> the W4A16 kernel's words (layout above), K zero-padded
    to whole groups."""
    if group % 32:
        raise ValueError(f"the W4A16 layout needs a group size divisible by 32, got {group}")
    n = packed.shape[0]
    tiles, groups = -(-n // W4A16_ROWS), -(-k // group)
    nibbles = unpack_codes(packed, 4, k, signed=False)
    nibbles = F.pad(nibbles, (0, groups * group - k, 0, tiles * W4A16_ROWS - n))
    nibbles = nibbles.view(tiles, W4A16_ROWS, groups, group // 32, 2, 2, 4, 2)
    nibbles = nibbles.permute(0, 2, 1, 6, 3, 4, 5, 7)  # tile, group, row, c, t, j2, j1, j0
    shifts = 4 * torch.tensor(_W4A16_SLOTS, device=packed.device)
    words = (nibbles.reshape(tiles, groups, W4A16_ROWS, group // 8, 8).long() << shifts).sum(-1)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def w4a16_codes(words, n, k, group):
    """Inverse of w4a16_words: signed codes [N, K] int8."""
    tiles, groups = words.shape[:2]
    shifts = 4 * torch.tensor(_W4A16_SLOTS, device=words.device)
    nibbles = (words.long()[..., None] >> shifts) & 0xF
    nibbles = nibbles.view(tiles, groups, W4A16_ROWS, 4, group // 32, 2, 2, 2)
    nibbles = nibbles.permute(0, 2, 1, 4, 5, 6, 3, 7)  # tile, row, group, t, j2, j1, c, j0
    codes = nibbles.reshape(tiles * W4A16_ROWS, groups * group)[:n, :k]
    return ((codes ^ 8) - 8).to(torch.int8)


def w4a16_gemm(x, words, scale, k, group, bias=None):
    """Reference of kernels.int4_weights.w4a16_gemm, in fp32 (weights in w4a16_words' layout,
    scale [N, G])."""
    w = w4a16_codes(words, scale.shape[0], k, group).float() * _per_column(scale, group, k)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
