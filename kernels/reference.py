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


def w4a16_gemm(x, packed, scale, k, group, bias=None):
    """Reference of kernels.int4_weights.w4a16_gemm, in fp32."""
    codes = unpack_codes(packed, 4, k, signed=True).float()
    w = codes * _per_column(scale, group, k)
    y = x.float() @ w.T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
