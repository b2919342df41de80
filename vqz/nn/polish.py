"""Activation polishing (QuartDepth): activations quantized in a log domain.

p(x) = sign(x)·(log2(|x| + α) - log2 α) with α > 0 per input channel; x = sign(p)·α·(2^|p| - 1)
inverts it. Small |x| (below α) stay nearly linear, large ones are compressed logarithmically, and
dividing by each channel's own α balances the channels, so one uniform quantizer fits all of them.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..config import QuantSpec
from .linear import QuantLinear


def polish(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """p(x) for x [..., K] and α [K] (> 0), in float32."""
    x, alpha = x.float(), alpha.float()
    # log2(|x| + α) - log2 α as log1p: no cancellation where |x| << α
    return torch.sign(x) * torch.log1p(x.abs() / alpha) / math.log(2.0)


def unpolish(p: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The inverse of `polish`: x = sign(p)·α·(2^|p| - 1), in float32."""
    p, alpha = p.float(), alpha.float()
    return torch.sign(p) * alpha * torch.expm1(p.abs() * math.log(2.0))  # 2^|p| - 1, exact near 0


class PolishedQuantizer(nn.Module):
    """An activation quantizer applied in the polished domain: x -> unpolish(Q(polish(x))).

    `inner` is the uniform quantizer (its spec, observers and scales see polished values); `alpha`
    [K] is the per-channel offset, set from calibration statistics."""

    def __init__(self, inner: nn.Module, channels: int):
        super().__init__()
        self.inner = inner
        self.register_buffer("alpha", torch.ones(channels))

    @property
    def spec(self) -> QuantSpec:
        return self.inner.spec

    @property
    def calibrated(self) -> bool:
        return self.inner.calibrated

    def observe(self, x: torch.Tensor) -> None:
        self.inner.observe(polish(x, self.alpha))

    def finalize(self) -> None:
        self.inner.finalize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return unpolish(self.inner(polish(x, self.alpha)), self.alpha).to(x.dtype)


class PolishedQuantLinear(QuantLinear):
    """QuantLinear whose activations are quantized in the polished domain. Always runs the
    pure-torch path: the fused kernels quantize activations uniformly, not in the log domain."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias, **kwargs)
        if self.act_quantizer is None:
            raise ValueError("polishing needs an activation spec")
        self.act_quantizer = PolishedQuantizer(self.act_quantizer, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reference_forward(x)
