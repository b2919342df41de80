"""QuantLinear: y = Q(x̂) Q(R)ᵀ + (x̂ L1) L2 + b, with x̂ = x / λ (times H when the layer rotates)."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantSpec
from ..kernels import linear_impl
from .base import QuantModule
from .rotation import hadamard_rotate, quantizer_input
from .timestep import make_act_quantizer
from .weight import QuantWeight


class QuantLinear(QuantModule):
    """A linear layer with quantized weights and activations.

    Weight `qweight`: the quantized [N, K] matrix R (the whole smoothed weight when there is no
    low-rank branch). `smooth` [K] (float32): per-input-channel divisor λ applied before activation
    quantization. `rotate`: the input is then multiplied by the block Hadamard matrix H, and R and
    L1 are stored rotated to match. `lora_down` [K, r] and `lora_up` [r, N]: the 16-bit low-rank
    branch on x̂. With `weight_spec=None` the weight stays a float parameter `weight`
    (activation-only configs).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_spec: QuantSpec | None, act_spec: QuantSpec | None, rank: int = 0,
                 smooth: bool = False, act_buckets: int = 0, rotate: bool = False, device=None,
                 dtype=None):
        super().__init__()
        if rotate and weight_spec is None:
            raise ValueError("a rotated layer needs a weight spec (its weight is stored rotated)")
        self.in_features, self.out_features, self.rotate = in_features, out_features, rotate
        self.weight_spec, self.act_spec, self.rank = weight_spec, act_spec, rank
        factory = {"device": device, "dtype": dtype}
        if weight_spec is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory))
            self.qweight = None
        else:
            self.qweight = QuantWeight(weight_spec, out_features, in_features, device=device)
        self.act_quantizer = make_act_quantizer(act_spec, act_buckets) if act_spec is not None else None
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_buffer("smooth", torch.ones(in_features, device=device) if smooth else None)
        self.lora_down = nn.Parameter(torch.empty(in_features, rank, **factory)) if rank else None
        self.lora_up = nn.Parameter(torch.empty(rank, out_features, **factory)) if rank else None

    @classmethod
    def from_float(cls, linear: nn.Linear, weight_spec: QuantSpec | None, act_spec: QuantSpec | None, *,
                   smooth: torch.Tensor | None = None,
                   lowrank: tuple[torch.Tensor, torch.Tensor] | None = None,
                   act_buckets: int = 0, rotate: bool = False,
                   round_weight: Callable[[torch.Tensor], dict] | None = None) -> QuantLinear:
        """Quantize `linear`. `smooth`: λ [K]; `lowrank`: (L1 [K, r], L2 [r, N]) approximating
        (W diag(λ))ᵀ; the weight quantizer then sees the residual R = W diag(λ) - (L1 L2)ᵀ (with
        `rotate`, W diag(λ) H - (H L1 L2)ᵀ).
        `round_weight`: R [N, K] float32 -> its codes and scales laid out as
        `Quantizer(weight_spec).quantize(R)` returns them (GPTQ, say); default round-to-nearest.
        A callable rather than the codes themselves, since R depends on how L1 L2 is stored."""
        if weight_spec is None and (smooth is not None or lowrank is not None):
            raise ValueError("smoothing and a low-rank branch need a weight spec")
        w = linear.weight.detach()
        rank = 0 if lowrank is None else lowrank[0].shape[1]
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    weight_spec=weight_spec, act_spec=act_spec, rank=rank, smooth=smooth is not None,
                    act_buckets=act_buckets, rotate=rotate, device=w.device, dtype=w.dtype)
        residual, branch = split_weight(w, smooth, lowrank, rotate)
        if smooth is not None:
            layer.smooth.copy_(smooth)
        if branch is not None:
            layer.lora_down.data.copy_(branch[0])
            layer.lora_up.data.copy_(branch[1])
        if weight_spec is None:
            layer.weight.data.copy_(w)
        elif round_weight is not None:
            layer.qweight = QuantWeight.from_quantized(round_weight(residual), weight_spec)
        else:
            layer.qweight = QuantWeight.from_float(residual, weight_spec)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    def smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """x̂: what the activation quantizer and the branch see."""
        return quantizer_input(x, self.smooth, self.rotate)

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        """Q(R) [N, K] (or the float weight for activation-only configs)."""
        return self.weight.to(dtype) if self.qweight is None else self.qweight(dtype)

    def act_quantizers(self) -> list[nn.Module]:
        return [] if self.act_quantizer is None else [self.act_quantizer]

    def observe(self, x: torch.Tensor) -> None:
        if self.act_quantizer is not None and not self.act_quantizer.spec.dynamic:
            self.act_quantizer.observe(self.smoothed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = linear_impl(self, x)
        if fused is not None:
            return fused(self, x)
        return self.reference_forward(x)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pure-torch definition every kernel is tested against."""
        xs = self.smoothed(x)
        xq = self.act_quantizer(xs) if self.act_quantizer is not None and self.act_enabled else xs
        bias = None if self.bias is None else self.bias.to(x.dtype)
        y = F.linear(xq, self.dequantized_weight(x.dtype), bias)
        if self.lora_down is not None:
            y = y + (xs @ self.lora_down.to(x.dtype)) @ self.lora_up.to(x.dtype)
        return y

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, rank={self.rank}, smooth={self.smooth is not None}"
                + (", rotate=True" if self.rotate else ""))


def split_weight(w: torch.Tensor, smooth: torch.Tensor | None,
                 lowrank: tuple[torch.Tensor, torch.Tensor] | None, rotate: bool):
    """What a layer with smoothing λ, branch `lowrank` = (L1 [K, r], L2 [r, N], approximating
    (W diag(λ))ᵀ) and the rotation H holds of the weight `w` [N, K]: the residual
    R = W diag(λ) H - (H L1 L2)ᵀ [N, K] (float32; H = I without `rotate`) and the branch as stored,
    (H L1, L2) in w's dtype (None without `lowrank`). R subtracts the stored branch, so its
    rounding lands in R, which is what gets quantized."""
    residual = w.float()
    if smooth is not None:
        residual = residual * smooth.float()
    if rotate:
        residual = hadamard_rotate(residual)
    if lowrank is None:
        return residual, None
    l1, l2 = lowrank
    # fresh row-major copies: BLAS may round a product of column-major factors differently
    stored = {"dtype": w.dtype, "copy": True, "memory_format": torch.contiguous_format}
    down = (hadamard_rotate(l1.float().T).T if rotate else l1).to(**stored)
    up = l2.to(**stored)
    return residual - (down.float() @ up.float()).T, (down, up)
