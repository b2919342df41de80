"""Adapter for timm Vision Transformers (ViT, DeiT, DeiT-III: all `VisionTransformer` with the same
`Attention` class). Claimed by class name, so timm is never imported.

The patch embedding and the classifier head stay in 16-bit (RepQ-ViT / PTQ4ViT practice); every
block's qkv, proj, fc1 and fc2 are quantized, and with a config's `attn` the attention products too.
"""
from __future__ import annotations

from torch import nn

from ..config import LayerRule
from .base import Adapter, register_adapter

NOTES = {
    "patch_embed.proj": ("patch embedding: reads raw pixels (the first layer, most sensitive) and is "
                         "a small share of the compute"),
    "head": ("classifier head: writes the logits directly with no later layer to absorb its "
             "error, and runs on one token"),
    "head_dist": "DeiT distillation head: as the classifier head",
}

# Where timm has defined its Attention class (timm >= 1.0.20 moved it to timm.layers).
_ATTENTION_MODULES = ("timm.layers.attention", "timm.models.vision_transformer")


def _claims(model: nn.Module) -> bool:
    return any(c.__name__ == "VisionTransformer" and c.__module__.startswith("timm.")
               for c in type(model).__mro__)


def is_timm_attention(module: nn.Module) -> bool:
    """timm's ViT Attention itself; subclasses may change forward, which QuantAttention restates."""
    cls = type(module)
    return cls.__name__ == "Attention" and cls.__module__ in _ATTENTION_MODULES


def norm_consumers(model: nn.Module) -> dict:
    """Each block's norm1 feeds attn.qkv and norm2 feeds mlp.fc1."""
    pairs = {}
    for i, block in enumerate(getattr(model, "blocks", [])):
        if isinstance(getattr(block, "norm1", None), nn.LayerNorm) and hasattr(block.attn, "qkv"):
            pairs[f"blocks.{i}.norm1"] = [f"blocks.{i}.attn.qkv"]
        if isinstance(getattr(block, "norm2", None), nn.LayerNorm) and hasattr(block.mlp, "fc1"):
            pairs[f"blocks.{i}.norm2"] = [f"blocks.{i}.mlp.fc1"]
    return pairs


VIT = Adapter("timm-vit", claims=_claims,
              default_rules=tuple(LayerRule(p, skip=True) for p in NOTES),
              notes=dict(NOTES), attention=is_timm_attention, norm_consumers=norm_consumers)
register_adapter(VIT)
