"""Adapters for timm's vision transformers: ViT, DeiT, DeiT-III (`VisionTransformer`), Swin
(`SwinTransformer`), EVA/EVA-02 (`Eva`) and BEiT (`Beit`). Claimed by class name (subclasses
included), so timm is never imported.

The patch embedding and the classifier head stay in 16-bit (RepQ-ViT / PTQ4ViT practice); every
block's Linear layers are quantized, and with a config's `attn` the attention products too (the
attention classes vqz.nn restates). All four are the "vit" preset family: generic preset names
resolve to the ViT recipes (`w8a8` -> `vit-w8a8`).
"""
from __future__ import annotations

from torch import nn

from ..config import LayerRule
from ..nn import attention_wrapper
from .base import Adapter, register_adapter

PATCH = ("patch embedding: reads raw pixels (the first layer, most sensitive) and is a small share "
         "of the compute")
HEAD = ("classifier head: writes the logits directly with no later layer to absorb its error, and "
        "runs on one token")
VIT_NOTES = {"patch_embed.proj": PATCH, "head": HEAD,
             "head_dist": "DeiT distillation head: as the classifier head"}
SWIN_NOTES = {"patch_embed.proj": PATCH, "head.fc": HEAD}

# Pre-norm blocks (x + attn(norm1(x)), x + mlp(norm2(x))), the only ones whose norms feed the
# Linear layers directly. Post-norm variants (ViT's ResPostBlock, EvaBlockPostNorm) normalise the
# branch output instead: nothing to fold there.
_PRE_NORM_BLOCKS = {("Block", "timm.models.vision_transformer"),
                    ("SwinTransformerBlock", "timm.models.swin_transformer"),
                    ("EvaBlock", "timm.models.eva"), ("Block", "timm.models.beit")}


def _claims(class_name: str):
    def claims(model: nn.Module) -> bool:
        return any(c.__name__ == class_name and c.__module__.startswith("timm.")
                   for c in type(model).__mro__)
    return claims


def is_wrapped_attention(module: nn.Module) -> bool:
    """An attention class vqz.nn restates (ViT, Swin window, EVA and BEiT attention)."""
    return attention_wrapper(module) is not None


def _foldable_norm(norm) -> bool:
    return isinstance(norm, nn.LayerNorm) and norm.elementwise_affine and norm.bias is not None


def _biased_linear(module) -> bool:
    return type(module) is nn.Linear and module.bias is not None


def _mlp_inputs(mlp: nn.Module) -> list[str]:
    """The Linear layers reading the MLP input: fc1 (Mlp, GluMlp) or fc1_g and fc1_x (SwiGLU)."""
    return [n for n in ("fc1", "fc1_g", "fc1_x") if isinstance(getattr(mlp, n, None), nn.Linear)]


def _swin_pads(block: nn.Module) -> bool:
    """Whether a Swin block zero-pads its windows (or may, with a dynamic input size): padded tokens
    bypass norm1, so qkv would see 0 where the fold assumes norm1's shifted output."""
    if getattr(block, "dynamic_mask", False):
        return True
    return any(r % w for r, w in zip(block.input_resolution, block.window_size, strict=True))


def norm_consumers(model: nn.Module) -> dict:
    """{LayerNorm name: Linear names reading it} of every pre-norm block: norm1 feeds attn.qkv and
    norm2 the MLP input layers. A pair is left out where the fold could not be exact: consumers
    without their own bias have nowhere to take the fold's shift (EVA and BEiT keep qkv's q/v
    biases on the attention and k has none, so their norm1 is skipped; Swin's PatchMerging
    reduction has no bias either), and Swin blocks that pad their windows."""
    pairs = {}
    for name, block in model.named_modules():
        if (type(block).__name__, type(block).__module__) not in _PRE_NORM_BLOCKS:
            continue
        qkv = getattr(block.attn, "qkv", None)
        pads = type(block).__name__ == "SwinTransformerBlock" and _swin_pads(block)
        if _foldable_norm(block.norm1) and _biased_linear(qkv) and not pads:
            pairs[f"{name}.norm1"] = [f"{name}.attn.qkv"]
        fcs = _mlp_inputs(block.mlp)
        if _foldable_norm(block.norm2) and fcs and all(_biased_linear(getattr(block.mlp, n))
                                                       for n in fcs):
            pairs[f"{name}.norm2"] = [f"{name}.mlp.{n}" for n in fcs]
    return pairs


def _vit_family(name: str, class_name: str, notes: dict) -> Adapter:
    return Adapter(name, claims=_claims(class_name),
                   default_rules=tuple(LayerRule(p, skip=True) for p in notes), notes=dict(notes),
                   attention=is_wrapped_attention, norm_consumers=norm_consumers, family="vit")


VIT = _vit_family("timm-vit", "VisionTransformer", VIT_NOTES)
SWIN = _vit_family("timm-swin", "SwinTransformer", SWIN_NOTES)
EVA = _vit_family("timm-eva", "Eva", {"patch_embed.proj": PATCH, "head": HEAD})
BEIT = _vit_family("timm-beit", "Beit", {"patch_embed.proj": PATCH, "head": HEAD})
for _adapter in (VIT, SWIN, EVA, BEIT):
    register_adapter(_adapter)
