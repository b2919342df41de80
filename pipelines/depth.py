"""Adapters for transformers' monocular depth estimators: Depth Anything (v1/v2) and DPT.

Both are a ViT backbone, a DPT neck (reassemble: tokens -> 4 feature maps at 4x, 2x, 1x, 1/2x the
patch grid; fusion: refine and upsample from coarse to fine) and a small conv head. The ViT blocks
and the coarse neck stages are quantized; the layers that see the raw image or the finest,
full-resolution features stay 16-bit (QuartDepth keeps the same boundary layers high precision).
The neck always has 4 stages in released checkpoints, so its finest stage is index 0 in the
reassemble stage / `neck.convs` and index 3 in the fusion stage (which runs coarse to fine).
Models are claimed by transformers class name (subclasses included); transformers is not imported.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import LayerRule
from .base import Adapter, register_adapter

PATCH = ("patch embedding: reads the raw RGB pixels (the first layer, sensitive), and its compute "
         "is negligible next to the ViT blocks")
REASSEMBLE = ("finest reassemble stage: its features are upsampled 4x and carry the fine detail "
              "(edges, thin structures) that per-pixel depth error is most sensitive to")
FINE_CONV = ("neck conv on the finest (4x) feature map: reads the full-resolution features, whose "
             "error reaches every output pixel unaveraged")
FUSION = ("last fusion block: refines the full-resolution features right before the head, so no "
          "later layer averages its error away")
UNUSED = ("never runs: the coarsest fusion block has no residual input, but transformers builds "
          "its residual unit anyway (static calibration would find no input for it)")
HEAD_OUT = ("head's final conv: writes the depth map directly (1 output channel: nothing to "
            "average its error over)")

DEPTH_ANYTHING = {
    "backbone.embeddings.patch_embeddings.projection": PATCH,
    "neck.reassemble_stage.layers.0.*": REASSEMBLE,
    "neck.convs.0": FINE_CONV,
    "neck.fusion_stage.layers.3.*": FUSION,
    "neck.fusion_stage.layers.0.residual_layer1.*": UNUSED,
    "head.conv3": HEAD_OUT,
}
DPT = {
    "dpt.embeddings.patch_embeddings.projection": PATCH,
    "neck.reassemble_stage.layers.0.*": REASSEMBLE,
    "neck.convs.0": FINE_CONV,
    "neck.fusion_stage.layers.3.*": FUSION,
    "neck.fusion_stage.layers.0.residual_layer1.*": UNUSED,
    "head.head.4": HEAD_OUT,
}
CLASSES = {"DepthAnythingForDepthEstimation": DEPTH_ANYTHING, "DPTForDepthEstimation": DPT}


def _claims(class_name: str):
    def claims(model: nn.Module) -> bool:
        return any(c.__name__ == class_name and c.__module__.startswith("transformers")
                   for c in type(model).__mro__)
    return claims


def transformer_blocks(model: nn.Module) -> list[str]:
    """The backbone's transformer layers (`...encoder.layer.<i>`), in execution order: the blocks
    whose outputs QuartDepth's weight reconstruction matches."""
    return [name for name, module in model.named_modules()
            if name.rpartition(".")[0].endswith("encoder.layer") and name.rpartition(".")[2].isdigit()]


for _name, _rules in CLASSES.items():
    register_adapter(Adapter(_name, claims=_claims(_name),
                             default_rules=tuple(LayerRule(p, skip=True) for p in _rules),
                             notes=dict(_rules), family="depth", blocks=transformer_blocks))


def is_depth_model(model: nn.Module) -> bool:
    return any(_claims(name)(model) for name in CLASSES)


def depth_forward(model: nn.Module, pixel_values: torch.Tensor) -> torch.Tensor:
    """Predicted depth [B, h, w] for preprocessed images [B, 3, h, w] (the model's own units:
    relative disparity for Depth Anything relative / MiDaS-style DPT, metres for metric models)."""
    with torch.no_grad():
        return model(pixel_values=pixel_values).predicted_depth


def default_alignment(model: nn.Module) -> str:
    """The `align` mode that suits the model's output: "none" for metric Depth Anything
    (config.depth_estimation_type == "metric"), else "lstsq-disparity" (relative inverse depth,
    as Depth Anything relative and the MiDaS-trained DPT checkpoints output)."""
    kind = getattr(model.config, "depth_estimation_type", "relative")
    return "none" if kind == "metric" else "lstsq-disparity"
