"""Running QuantLinear layers on the kernels: which layers qualify, the runtime layout built from the
stored (row-major, packed) format, and the forward through the custom ops.

Kinds of layer the kernels run (anything else keeps the pure-torch reference):
- "int8": activations quantized per token to INT8 (symmetric or asymmetric) or per token per group
  with two-level scales; weights INT8/INT4 per output channel or INT4 groups with two-level scales.
  Both operands are then int8 with one fp scale per row: one INT8 GEMM, fp work in its epilogue.
  Smoothing (and the rotation) are fused into the activation kernel; the low-rank branch's
  down-projection is one cuBLAS GEMM on the raw input with λ and the rotation folded into its
  factor, its up-projection runs in the GEMM's epilogue.
- "fp8": FP8 E4M3 weights per channel and activations per token, on torch._scaled_mm.
- "w4a16": 4-bit grouped weights with full-precision activations, for at most 64 tokens, on a
  second copy of the 4-bit codes reordered for the kernel (reference.w4a16_words).
NVFP4 layers run the reference path's 16-bit product, with their activations quantized by the NVFP4
kernel on CUDA (`block_round`, called by Quantizer.forward) and their weights dequantized by its
decode kernel (`kernel_weight_values`, called by QuantWeight.forward).

Layouts of 4-bit weights (same codes, same results): "speed" holds int8 code * multiplier in GPU
memory (8 bits a weight; a plain INT8 GEMM reads it), "memory" keeps only the packed 4-bit codes and
unpacks each layer into a transient workspace before its GEMM.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from vqz.formats import FPFormat, IntFormat, unpack_codes
from vqz.nn.rotation import hadamard_rotate

from . import ops, reference
from .dispatch import register_linear_kernel

LAYOUTS = ("speed", "memory")
DEFAULT_LAYOUT = "speed"
W4A16_MAX_TOKENS = 64
MAX_RANK = 256  # widest low-rank branch the fused int8 kernels take; a wider one runs the reference
RANK_MULTIPLE = 16  # the MMA's minimum: the kernels zero-pad a branch to a multiple of it


def _is_int(spec, max_bits=8) -> bool:
    return isinstance(spec.fmt, IntFormat) and spec.fmt.bits <= max_bits


def _weight_as_int8(spec) -> bool:
    """Weights whose dequantized value is int8 * one fp scale per output channel."""
    if spec is None or not spec.symmetric or not _is_int(spec):
        return False
    if spec.granularity == "channel":
        return spec.axis == 0
    return spec.granularity == "group" and spec.int_group_scales > 0


def _act_mode(spec) -> str | None:
    """The activation kernel that reproduces this dynamic activation spec, if any (none takes a
    learned clip ratio yet)."""
    if spec is None or not spec.dynamic or spec.learnable:
        return None
    if spec.granularity == "token" and spec.format == "int8":
        return "int8" if spec.symmetric else "int8-asym"
    if spec.granularity == "token" and spec.format == "e4m3":
        return "e4m3"
    group = spec.group_size or 0
    if spec.granularity == "group" and spec.int_group_scales and _is_int(spec, 4) \
            and group >= 16 and group & (group - 1) == 0:
        return "group"
    return None


def kernel_kind(layer) -> str | None:
    """"int8", "fp8", "w4a16" or None (reference only) for a QuantLinear's specs."""
    w, a = layer.weight_spec, layer.act_spec
    if w is None or (layer.rank and layer.rank > MAX_RANK):
        return None
    mode = _act_mode(a)
    if mode in ("int8", "int8-asym", "group") and _weight_as_int8(w):
        return "int8"
    # the fp8 path has no low-rank branch (a LoRA gives one to fp8 layers)
    if mode == "e4m3" and isinstance(w.fmt, FPFormat) and w.format == "e4m3" \
            and w.granularity == "channel" and w.axis == 0 and not layer.rank:
        return "fp8"
    if a is None and w.granularity == "group" and w.symmetric and _is_int(w, 4) \
            and not w.int_group_scales and w.group_size % 32 == 0 and not layer.rank \
            and layer.smooth is None:
        return "w4a16"
    return None


def _op(name: str, device: torch.device):
    """The custom op while torch.compile traces, the Triton launch in eager CUDA calls, the plain
    reference elsewhere."""
    if device.type != "cuda":
        return ops.PLAIN[name]
    return (ops.CUSTOM if torch.compiler.is_compiling() else ops.DIRECT)[name]


def _set(layer, name: str, value: torch.Tensor | None) -> None:
    layer.register_buffer(name, value, persistent=False)


def padded_rank(rank: int) -> int:
    """`rank` rounded up to a multiple of RANK_MULTIPLE."""
    return rank + -rank % RANK_MULTIPLE


def _padded_rank(t: torch.Tensor, dim: int) -> torch.Tensor:
    """The low-rank factor with its rank padded with zeros to a multiple of RANK_MULTIPLE."""
    pad = padded_rank(t.shape[dim]) - t.shape[dim]
    if not pad:
        return t.contiguous()
    return F.pad(t, (0, pad) if dim == 1 else (0, 0, 0, pad)).contiguous()


@torch.no_grad()
def prepare(layer, layout: str = DEFAULT_LAYOUT) -> bool:
    """Build the runtime tensors of one QuantLinear (non-persistent buffers, so checkpoints keep the
    stored format). Returns False for layers the kernels do not run."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown kernel layout {layout!r}; use one of {LAYOUTS}")
    kind = kernel_kind(layer)
    layer.kernel_kind, layer.kernel_layout = kind, layout
    if kind is None:
        return False
    qw = layer.qweight
    if kind == "w4a16":  # the same codes in the kernel's order: a second 4-bit copy
        _set(layer, "kernel_weight",
             reference.w4a16_words(qw.codes, qw.k, layer.weight_spec.group_size))
        return True
    if kind == "fp8":
        _set(layer, "kernel_weight", qw.codes.view(torch.float8_e4m3fn))
        _set(layer, "kernel_wscale", qw.scale.reshape(1, -1).float())
        return True
    grouped = layer.weight_spec.granularity == "group"
    packed = grouped and layer.weight_spec.fmt.bits <= 4
    if packed:
        weight = _op("unpack_int4", qw.codes.device)(qw.codes, qw.group_scale, qw.k,
                                                       layer.weight_spec.group_size)
    else:
        weight = unpack_codes(qw.codes, layer.weight_spec.fmt.bits, qw.k, signed=True)
    # memory layout: leave the packed codes resident, unpack per call
    _set(layer, "kernel_weight", None if packed and layout == "memory" else weight.contiguous())
    _set(layer, "kernel_wscale", qw.scale.reshape(-1).float().contiguous())
    asym = not layer.act_spec.symmetric
    _set(layer, "kernel_colsum", weight.float().sum(1) if asym else None)
    prepare_branch(layer)
    return True


@torch.no_grad()
def prepare_branch(layer) -> None:
    """The kernels' copy of an int8 layer's low-rank branch, its rank padded to RANK_MULTIPLE (the
    rest of the runtime layout does not depend on the branch). The branch's input is
    rotate(x / λ) = x diag(1/λ) H, so its down factor becomes diag(1/λ) H L1, computed in
    fp32."""
    if layer.rank:
        _set(layer, "kernel_l1", _padded_rank(folded_down(layer), 1))
        _set(layer, "kernel_l2", _padded_rank(layer.lora_up.detach(), 0))


def folded_down(layer) -> torch.Tensor:
    """diag(1/λ) H L1 [K, R] in L1's dtype: x times it is the branch's down-projection."""
    down = layer.lora_down.detach().float()
    if layer.rotate:  # H is symmetric: H L1 = (L1ᵀ H)ᵀ
        down = hadamard_rotate(down.T).T
    if layer.smooth is not None:
        down = down / layer.smooth.float()[:, None]
    return down.to(layer.lora_down.dtype)


def prepare_model(model: torch.nn.Module, layout: str = DEFAULT_LAYOUT) -> int:
    """Prepare every QuantLinear of `model` for the kernels; returns how many qualify."""
    from vqz.nn import QuantLinear

    return sum(prepare(m, layout) for m in model.modules() if isinstance(m, QuantLinear))


def _inference(layer, x: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return True
    return not x.requires_grad and not any(p.requires_grad for p in layer.parameters())


def accepts(layer, x: torch.Tensor) -> bool:
    if not (x.is_cuda and ops.TRITON_ON_CUDA and layer.act_enabled and _inference(layer, x)):
        return False
    if getattr(layer, "kernel_layout", None) is None:
        if torch.compiler.is_compiling():
            return False  # prepare before compiling: vqz.kernels.prepare_model(model)
        prepare(layer)
    kind = layer.kernel_kind
    if kind == "w4a16":
        return x.numel() // x.shape[-1] <= W4A16_MAX_TOKENS
    if kind == "fp8":  # torch._scaled_mm: row-wise scales need bf16 out, dims multiples of 16
        return x.dtype == torch.bfloat16 and layer.in_features % 16 == 0 \
            and layer.out_features % 16 == 0
    return kind == "int8" and x.dtype in ops.OUT_DTYPES


def run(layer, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    bias = layer.bias
    if layer.kernel_kind == "w4a16":
        qw = layer.qweight
        y = _op("w4a16_gemm", x.device)(x2, layer.kernel_weight, qw.scale, qw.k,
                                        layer.weight_spec.group_size, bias)
    elif layer.kernel_kind == "fp8":
        a, scale, _ = _op("act_quant_token", x.device)(x2, layer.smooth, "e4m3", layer.rotate)
        y = torch._scaled_mm(a, layer.kernel_weight.t(), scale_a=scale[:, None],
                             scale_b=layer.kernel_wscale, bias=bias, out_dtype=x.dtype)
    else:
        y = _run_int8(layer, x2, bias)
    return y.reshape(*shape[:-1], y.shape[-1])


def _run_int8(layer, x, bias):
    spec = layer.act_spec
    if spec.granularity == "group":
        a, scale = _op("act_quant_group", x.device)(x, layer.smooth, spec.group_size,
                                                    spec.int_group_scales, spec.fmt.bits,
                                                    layer.rotate)
        zp = None
    else:
        a, scale, zp = _op("act_quant_token", x.device)(x, layer.smooth, _act_mode(spec),
                                                        layer.rotate)
        zp = zp if zp.numel() else None
    xl1 = x @ layer.kernel_l1.to(x.dtype) if layer.rank else None
    weight = layer.kernel_weight
    if weight is None:
        qw = layer.qweight
        weight = _op("unpack_int4", x.device)(qw.codes, qw.group_scale, qw.k,
                                              layer.weight_spec.group_size)
    return _op("int8_gemm", x.device)(a, weight, scale, layer.kernel_wscale, zp,
                         getattr(layer, "kernel_colsum", None), xl1,
                         layer.kernel_l2 if layer.rank else None, bias, 0,
                         ops.OUT_DTYPES.index(x.dtype))


def block_round(fmt, x: torch.Tensor) -> torch.Tensor:
    """fmt.round(x) for a block format (the fake quantization of Quantizer.forward): NVFP4 on CUDA
    runs the Triton kernel, every other case the format's pure-torch round."""
    if fmt.name == "nvfp4" and x.is_cuda and ops.TRITON_ON_CUDA:
        return _op("nvfp4_round", x.device)(x)
    return fmt.round(x)


def kernel_weight_values(qweight, dtype: torch.dtype) -> torch.Tensor | None:
    """A stored weight's values [N, K] in `dtype` from a kernel (NVFP4 on CUDA, 16/32-bit
    `dtype`), or None where the reference dequantizes."""
    if not (qweight.spec.fmt.name == "nvfp4" and qweight.codes.is_cuda and ops.TRITON_ON_CUDA
            and dtype in ops.OUT_DTYPES):
        return None
    return _op("nvfp4_decode", qweight.codes.device)(qweight.codes, qweight.scale,
                                                    qweight.tensor_scale, qweight.k,
                                                    ops.OUT_DTYPES.index(dtype))


register_linear_kernel(accepts, run)
