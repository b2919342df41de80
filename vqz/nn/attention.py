"""QuantAttention: timm's ViT self-attention with its activation products quantized (RepQ-ViT).

The post-Softmax probabilities get a log quantizer. Calibration uses log√2 codes; inference can run
`attn @ v` as two log2-coded products with parity-dependent scales (`log_sqrt2_attn_v`), which is
the same product with only shifts on the probabilities.
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

# The modules a timm Attention holds, kept under their own names so that the planner's Linear
# plans (`<path>.qkv`, `<path>.proj`) find them inside the replacement.
_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")


class QuantAttention(QuantModule):
    """timm `Attention.forward` (non-fused path) with `q·scale @ kᵀ` and `attn @ v` through
    QuantMatMul and the softmax output through a static per-tensor log quantizer.

    With `act_enabled` False it computes exactly what timm's Attention computes. While `observing`
    is True (set by calib.observe_layers) it feeds the full-precision operands of both products to
    their static quantizers: they are internal, so no forward pre-hook can see them.
    """

    observes_in_forward = True

    def __init__(self, attention: nn.Module, operand_spec: QuantSpec, probs_spec: QuantSpec,
                 act_buckets: int = 0):
        super().__init__()
        for name in _CHILDREN:
            setattr(self, name, getattr(attention, name, None))
        self.num_heads, self.head_dim = attention.num_heads, attention.head_dim
        self.attn_dim = getattr(attention, "attn_dim", self.num_heads * self.head_dim)
        self.scale = attention.scale
        self.operand_spec, self.probs_spec = operand_spec, probs_spec
        self.qk = QuantMatMul(operand_spec, operand_spec, act_buckets)
        self.av = QuantMatMul(None, operand_spec, act_buckets)  # probs: quantized by probs_quantizer
        self.probs_quantizer = make_act_quantizer(probs_spec, act_buckets)
        self.observing = False

    def act_quantizers(self) -> list[nn.Module]:
        return [*self.qk.act_quantizers(), self.probs_quantizer, *self.av.act_quantizers()]

    def observe(self, *inputs: torch.Tensor) -> None:
        """The module's input says nothing about its products: see `observing`."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        B, N, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        q = q * self.scale
        kt = k.transpose(-2, -1)
        if self.observing:
            self.qk.observe(q, kt)
        attn = self.qk(q, kt) if self.act_enabled else q @ kt  # (qk's own flag stays on)
        bias = _mask_bias(N, attn, attn_mask, is_causal)
        if bias is not None:
            attn = attn + bias
        attn = attn.softmax(dim=-1)
        if self.observing:
            self.probs_quantizer.observe(attn)
            self.av.observe(attn, v)
        if self.act_enabled:
            attn = self.probs_quantizer(attn)
        attn = self.attn_drop(attn)
        x = self.av(attn, v) if self.act_enabled else attn @ v
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, "
                f"operands={self.operand_spec.format}, probs={self.probs_spec.format}")


def _mask_bias(n: int, attn: torch.Tensor, attn_mask: torch.Tensor | None,
               is_causal: bool) -> torch.Tensor | None:
    """timm's additive mask (SDPA semantics; is_causal wins over attn_mask)."""
    if is_causal:
        return attn.new_full((n, n), float("-inf")).triu_(1)
    if attn_mask is None or attn_mask.dtype != torch.bool:
        return attn_mask
    return torch.zeros_like(attn_mask, dtype=attn.dtype).masked_fill_(~attn_mask, float("-inf"))


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
