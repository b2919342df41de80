"""Model-family adapters: which layers to keep in full precision, UNet split points, calibration.

`adapter_for(model)` picks the adapter of a model's family; any model no adapter claims gets the
generic one (every Linear and Conv2d, no default exclusions).
"""
from . import diffusion  # noqa: F401  (registers the diffusers denoiser adapters)
from . import depth  # noqa: F401  (registers the transformers depth-estimator adapters)
from . import timm_vit  # noqa: F401  (registers the timm ViT/DeiT adapter)
from .base import Adapter, adapter_for, register_adapter

__all__ = ["Adapter", "adapter_for", "register_adapter"]
