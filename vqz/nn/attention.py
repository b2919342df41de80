"""Quantized self-attention (RepQ-ViT): what every attention wrapper shares.

A wrapper restates one timm attention class's forward (its non-fused path): it computes q, k, v and
the additive biases (relative position tables, window masks, causal masks) as timm does and hands
them to `QuantAttentionBase.attend`, which runs `q·scale @ kᵀ` and `attn @ v` through QuantMatMul
and the post-Softmax probabilities through a static per-tensor log quantizer.

The probabilities are calibrated with log√2 codes; inference can run `attn @ v` as two log2-coded
products with parity-dependent scales (`log_sqrt2_attn_v`), the same product with only shifts on
the probabilities.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import QuantSpec
from ..formats import get_format
from .base import QuantModule
from .matmul import QuantMatMul
from .timestep import make_act_quantizer

_WRAPPERS: list[type] = []


class QuantAttentionBase(QuantModule):
    """The products and the probability quantizer of one attention module.

    Subclasses set WRAPS, the exact timm classes whose forward they restate, as
    ((class name, (defining modules, ...)), ...); subclasses of those are not wrapped, since they
    may change forward. CHILDREN names the submodules, parameters and buffers adopted from the
    wrapped module under their own names (and persistence), so the planner's Linear plans
    (`<path>.qkv`, `<path>.proj`) and the checkpoint keys find them inside the wrapper.

    With `act_enabled` False a wrapper computes what the timm module computes. While `observing` is
    True (set by calib.observe_layers) `attend` feeds the full-precision operands of both products
    to their static quantizers: they are internal, so no forward pre-hook can see them.
    """

    observes_in_forward = True
    WRAPS: tuple = ()
    CHILDREN: tuple = ()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.WRAPS:
            _WRAPPERS.append(cls)

    def __init__(self, attention: nn.Module, operand_spec: QuantSpec, probs_spec: QuantSpec,
                 act_buckets: int = 0):
        super().__init__()
        for name in self.CHILDREN:
            _adopt(self, attention, name)
        self.num_heads, self.scale = attention.num_heads, attention.scale
        self.operand_spec, self.probs_spec = operand_spec, probs_spec
        self.qk = QuantMatMul(operand_spec, operand_spec, act_buckets)
        self.av = QuantMatMul(None, operand_spec, act_buckets)  # probs: quantized by probs_quantizer
        self.probs_quantizer = make_act_quantizer(probs_spec, act_buckets)
        self.observing = False

    @classmethod
    def wraps(cls, module: nn.Module) -> bool:
        t = type(module)
        return any(t.__name__ == name and t.__module__ in where for name, where in cls.WRAPS)

    @classmethod
    def weight_read_children(cls, module: nn.Module) -> tuple[str, ...]:
        """Children that the unwrapped module reads through `.weight` (F.linear) instead of calling
        them: a quantized replacement of those works only inside the wrapper."""
        return ()

    def act_quantizers(self) -> list[nn.Module]:
        return [*self.qk.act_quantizers(), self.probs_quantizer, *self.av.act_quantizers()]

    def observe(self, *inputs: torch.Tensor) -> None:
        """The module's input says nothing about its products: see `observing`."""

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               *biases: torch.Tensor | None) -> torch.Tensor:
        """softmax(q·scale @ kᵀ + biases...) @ v for q, k, v [B, H, N, D]; the biases (None: none)
        broadcast against [B, H, N, N] and are added in order, as timm adds them."""
        q = q * self.scale
        kt = k.transpose(-2, -1)
        if self.observing:
            self.qk.observe(q, kt)
        attn = self.qk(q, kt) if self.act_enabled else q @ kt  # (qk's own flag stays on)
        for bias in biases:
            if bias is not None:
                attn = attn + bias
        attn = attn.softmax(dim=-1)
        if self.observing:
            self.probs_quantizer.observe(attn)
            self.av.observe(attn, v)
        if self.act_enabled:
            attn = self.probs_quantizer(attn)
        attn = self.attn_drop(attn)
        return self.av(attn, v) if self.act_enabled else attn @ v

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, operands={self.operand_spec.format}, "
                f"probs={self.probs_spec.format}")


def attention_wrapper(module: nn.Module) -> type[QuantAttentionBase] | None:
    """The wrapper class that restates `module`'s forward, or None."""
    return next((cls for cls in _WRAPPERS if cls.wraps(module)), None)


def _adopt(wrapper: nn.Module, module: nn.Module, name: str) -> None:
    if name in module._parameters:
        wrapper.register_parameter(name, module._parameters[name])
    elif name in module._buffers:
        wrapper.register_buffer(name, module._buffers[name],
                                persistent=name not in module._non_persistent_buffers_set)
    elif name in module._modules:
        wrapper.add_module(name, module._modules[name])
    else:
        setattr(wrapper, name, getattr(module, name, None))


def mask_bias(n: int, attn_like: torch.Tensor, attn_mask: torch.Tensor | None,
              is_causal: bool) -> torch.Tensor | None:
    """timm's additive self-attention mask (SDPA semantics; is_causal wins over attn_mask)."""
    if is_causal:
        return attn_like.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=attn_like.dtype).masked_fill_(~attn_mask, float("-inf"))


def split_log_sqrt2(codes: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log√2 codes q -> (even, odd) "log2:bits" codes: even q gives e = q/2 (value 2^-e), odd q gives
    o = (q+1)/2 (value 2^-o, to be scaled by √2); the other part holds log2's zero code there.
    The log√2 zero code (2^bits - 1, odd) maps to zero in both parts."""
    zero_in, zero_out = 2**bits - 1, get_format(f"log2:{bits}").zero_code
    q = codes.long()
    live = q != zero_in
    even = torch.where(live & (q % 2 == 0), q // 2, zero_out)
    odd = torch.where(live & (q % 2 == 1), (q + 1) // 2, zero_out)
    return even.to(torch.uint8), odd.to(torch.uint8)


def log_sqrt2_attn_v(codes: torch.Tensor, scale: torch.Tensor, v: torch.Tensor,
                     bits: int) -> torch.Tensor:
    """attn @ v for probabilities held as log√2 codes with per-tensor `scale` s, computed in the
    log2 form of RepQ-ViT inference: (s·2^-e) @ v over even codes + (s·√2·2^-o) @ v over odd codes.
    Equal to (s·2^-⌈q/2⌉·(1 + (q mod 2)(√2 - 1))) @ v up to fp32 summation order; on integer
    hardware each part is a shift of v's rows and the √2 folds into the odd part's output scale."""
    log2 = get_format(f"log2:{bits}")
    even, odd = split_log_sqrt2(codes, bits)
    s = scale.to(v.dtype)
    return (log2.decode(even, v.dtype) * s) @ v + (log2.decode(odd, v.dtype) * (s * math.sqrt(2))) @ v
