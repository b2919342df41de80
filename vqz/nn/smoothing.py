"""The smoothing division of SVDQuant layers, shared by QuantLinear and the kernels' reference."""
from __future__ import annotations

import torch


def smooth_input(x: torch.Tensor, smooth: torch.Tensor | None) -> torch.Tensor:
    """x / λ as the kernels compute it: x times the fp32 reciprocal of λ, rounded to x's dtype."""
    return x if smooth is None else (x.float() * (1.0 / smooth.float())).to(x.dtype)
