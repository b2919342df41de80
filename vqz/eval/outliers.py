"""Injecting activation outliers into a trained model without changing its function.

Large models have a few input channels of the attention projections with huge activations; small
models lack them. Multiplying channel c of the normalization that feeds the projections by s, and
dividing column c of the projections' weights by s, leaves the full-precision output unchanged while
giving the quantizer those outliers — the test bed for smoothing, the SVD branch and RepQ.
"""
from __future__ import annotations

import torch
from torch import nn


def inject_outliers(model: nn.Module, scale: float = 50.0, fraction: float = 0.01,
                    seed: int = 0) -> list[str]:
    """Scale `fraction` of the channels (at least one) feeding each self-attention's input
    projections by `scale`, in place. Recognises diffusers transformer blocks (`norm1` ->
    `attn1.to_q/to_k/to_v`, with LayerNorm or AdaLayerNormZero) and timm blocks (`norm1` ->
    `attn.qkv`). Returns the names of the blocks changed; ValueError if there are none."""
    g = torch.Generator().manual_seed(seed)
    changed = []
    for name, block in model.named_modules():
        found = _norm_and_projections(block)
        if found is None:
            continue
        norm, projections = found
        dim = projections[0].in_features
        channels = torch.randperm(dim, generator=g)[:max(1, round(fraction * dim))]
        with torch.no_grad():
            _scale_output_channels(norm, channels, scale, dim)
            for linear in projections:
                linear.weight[:, channels] /= scale
        changed.append(name)
    if not changed:
        raise ValueError(f"no attention block with a recognised norm -> projection pattern in "
                         f"{type(model).__name__}")
    return changed


def _norm_and_projections(block: nn.Module):
    norm = getattr(block, "norm1", None)
    attn1, attn = getattr(block, "attn1", None), getattr(block, "attn", None)
    if norm is not None and attn1 is not None and hasattr(attn1, "to_q"):
        return norm, [attn1.to_q, attn1.to_k, attn1.to_v]
    if norm is not None and attn is not None and isinstance(getattr(attn, "qkv", None), nn.Linear):
        return norm, [attn.qkv]
    return None


def _scale_output_channels(norm: nn.Module, channels: torch.Tensor, scale: float, dim: int) -> None:
    if isinstance(norm, nn.LayerNorm) and norm.elementwise_affine:
        norm.weight[channels] *= scale
        if norm.bias is not None:
            norm.bias[channels] *= scale
        return
    linear = getattr(norm, "linear", None)
    if isinstance(linear, nn.Linear) and linear.out_features == 6 * dim:
        # AdaLayerNormZero: out = norm(x) * (1 + scale_msa) + shift_msa, chunks [shift, scale, ...].
        shift, mod = channels, channels + dim
        linear.weight[shift] *= scale
        linear.weight[mod] *= scale
        if linear.bias is not None:
            linear.bias[shift] *= scale
            linear.bias[mod] = linear.bias[mod] * scale + (scale - 1)
        return
    raise TypeError(f"cannot scale the output channels of a {type(norm).__name__}")
