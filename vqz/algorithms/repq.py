"""RepQ-ViT's post-LayerNorm reparameterization: per-channel activation ranges made per-tensor.

LayerNorm outputs differ wildly in range from channel to channel, which a per-tensor quantizer
cannot follow. With per-channel asymmetric parameters (scale s_c, zero point z_c) from calibration,
the LayerNorm's output channel c is divided by r1_c = s_c / mean(s) and shifted by mean(s)·r2_c,
r2_c = z_c - mean(z), so that every channel fits one per-tensor quantizer; the consuming Linear
layers undo it exactly: W' = W·diag(r1), b' = b - W'·(mean(s)·r2). The full-precision function is
unchanged.
"""
from __future__ import annotations

import torch
from torch import nn


def channel_balance(x_min: torch.Tensor, x_max: torch.Tensor, bits: int):
    """(divisor r1 [C], shift [C]) from per-channel ranges: y' = y / r1 + shift."""
    lo, hi = x_min.clamp(max=0), x_max.clamp(min=0)
    scale = (hi - lo).clamp_min(1e-8) / (2 ** bits - 1)
    zero = (-lo / scale).round()
    return scale / scale.mean(), scale.mean() * (zero - zero.mean())


@torch.no_grad()
def fold_into_layernorm(norm: nn.LayerNorm, consumers: list[nn.Linear], divisor: torch.Tensor,
                        shift: torch.Tensor) -> None:
    """In place: the LayerNorm outputs y / divisor + shift, and each consumer of y reads that
    instead, with the same outputs as before."""
    if not (norm.elementwise_affine and norm.bias is not None):
        raise ValueError("RepQ reparameterization needs a LayerNorm with weight and bias")
    divisor = divisor.to(norm.weight.device, torch.float32)
    shift = shift.to(norm.weight.device, torch.float32)
    norm.weight.copy_(norm.weight.float() / divisor)
    norm.bias.copy_(norm.bias.float() / divisor + shift)
    for linear in consumers:
        weight = linear.weight.float() * divisor
        if linear.bias is None:
            raise ValueError("RepQ reparameterization needs the consuming Linear layers to have a bias")
        linear.bias.copy_(linear.bias.float() - weight @ shift)
        linear.weight.copy_(weight)
