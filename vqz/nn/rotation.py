"""Block-Hadamard rotation of a Linear layer's input (QuaRot-style, in blocks of 64 = the
activation group size): y = x Wᵀ = (x H)(W H)ᵀ with H block-diagonal, orthonormal and symmetric.
A channel with outliers is spread over its block, so a group's range no longer comes from one
channel. The weight is stored rotated; the input is rotated at run time, after smoothing."""
from __future__ import annotations

import torch

from .smoothing import smooth_input

ROTATION_BLOCK = 64


def rotatable(in_features: int) -> bool:
    return in_features % ROTATION_BLOCK == 0


def hadamard_rotate(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K a multiple of 64) times H: a fast Walsh–Hadamard transform of every block of 64
    in fp32, butterflies of stride 1, 2, ..., 32 in that order, scaled by 1/8 (exact), returned in
    x's dtype."""
    shape = x.shape
    if not rotatable(shape[-1]):
        raise ValueError(f"the rotation works on blocks of {ROTATION_BLOCK} channels; got {shape[-1]}")
    v = x.float().reshape(-1, ROTATION_BLOCK)
    stride = 1
    while stride < ROTATION_BLOCK:
        pairs = v.reshape(v.shape[0], ROTATION_BLOCK // (2 * stride), 2, stride)
        a, b = pairs[:, :, 0], pairs[:, :, 1]
        v = torch.stack((a + b, a - b), dim=2).reshape(-1, ROTATION_BLOCK)
        stride *= 2
    return (v * (1.0 / 8.0)).reshape(shape).to(x.dtype)


def quantizer_input(x: torch.Tensor, smooth: torch.Tensor | None, rotate: bool) -> torch.Tensor:
    """What a layer's activation quantizer and low-rank branch see: x / λ, then rotated if the
    layer rotates."""
    x = smooth_input(x, smooth)
    return hadamard_rotate(x) if rotate else x
