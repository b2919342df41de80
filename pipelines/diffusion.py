"""Adapters for diffusers denoisers: which layers stay in 16-bit, and the UNet split points.

Every family keeps the same kinds of layers in 16-bit (SVDQuant/Nunchaku and Q-Diffusion practice):
the input embedders, the timestep/text/guidance embedders, the adaLN modulation linears and the final
output projection. Attention projections, feed-forwards and UNet resnet convs are quantized.
Models are claimed by diffusers class name (subclasses included), so diffusers is never imported.
"""
from __future__ import annotations

from torch import nn

from ..config import LayerRule
from .base import Adapter, register_adapter

PATCH = ("patch/input embedder: reads the raw latents (the first layer, sensitive), and its compute "
         "is negligible next to the blocks")
TIME = ("timestep/guidance/pooled-text embedder: runs on one vector per sample (negligible compute) "
        "and its error reaches every block through the conditioning")
TEXT = ("text-encoder projection: T5/CLIP/LLM hidden states carry extreme outlier channels, and it "
        "runs on the few text tokens only")
MOD = ("adaLN modulation: acts on the single timestep token (negligible compute), and its "
       "scale/shift/gate multiply every activation of the block, so its error is amplified")
OUT = ("final output projection: writes the predicted noise/velocity directly, with no later layer "
       "to absorb its error")


def _claims(class_name: str):
    def claims(model: nn.Module) -> bool:
        return any(c.__name__ == class_name and c.__module__.startswith("diffusers")
                   for c in type(model).__mro__)
    return claims


def _register(class_name: str, rules: dict, **extra) -> None:
    """One adapter keeping the layers matched by `rules` ({glob: reason}) in 16-bit."""
    register_adapter(Adapter(class_name, claims=_claims(class_name),
                             default_rules=tuple(LayerRule(p, skip=True) for p in rules),
                             notes=dict(rules), **extra))


def unet_splits(model: nn.Module) -> dict[str, tuple[int]]:
    """{conv name: (split,)} for the convs of UNet up blocks that read `cat([hidden, skip], dim=1)`.

    The split is the channel count of `hidden`, read from the model: the previous resnet's output for
    resnet j > 0; for j == 0, what enters the up block (the previous up block's output, or for the
    first up block the mid block's, or the last down block's where there is no mid block).
    """
    if getattr(model, "mid_block", None) is not None:
        entering = model.mid_block.resnets[-1].out_channels
    else:
        entering = model.down_blocks[-1].resnets[-1].out_channels
    splits = {}
    for i, block in enumerate(model.up_blocks):
        hidden = entering
        for j, resnet in enumerate(block.resnets):
            # a resnet reading only its hidden state has no skip part to split off
            if resnet.conv1.in_channels > hidden:
                for conv in ("conv1", "conv_shortcut"):
                    if isinstance(getattr(resnet, conv, None), nn.Conv2d):
                        splits[f"up_blocks.{i}.resnets.{j}.{conv}"] = (hidden,)
            hidden = resnet.out_channels
        entering = hidden
    return splits


UNET_COMMON = {
    "conv_in": PATCH,
    "time_embedding.*": TIME,
    "class_embedding*": TIME,
    "*.time_emb_proj": ("resnet timestep projection: maps the one timestep embedding per sample to "
                        "a channel bias (negligible compute, like adaLN modulation)"),
    "conv_out": OUT,
}
_register("UNet2DConditionModel", {
    **UNET_COMMON,
    "add_embedding.*": TIME + " (SDXL: pooled text and size/crop micro-conditioning)",
    "encoder_hid_proj*": TEXT,
}, splits=unet_splits)
_register("UNet2DModel", UNET_COMMON, splits=unet_splits)

_register("DiTTransformer2DModel", {
    "pos_embed.proj": PATCH,
    "transformer_blocks.*.norm1.emb.*": TIME + " (each block has its own timestep/label embedder)",
    "transformer_blocks.*.norm1.linear": MOD,
    "proj_out_1": MOD + " (final layer's shift/scale)",
    "proj_out_2": OUT,
})

_register("PixArtTransformer2DModel", {
    "pos_embed.proj": PATCH,
    "adaln_single.emb.*": TIME,
    "adaln_single.linear": MOD + " (adaLN-single: one modulation shared by all blocks)",
    "caption_projection.*": TEXT,
    "proj_out": OUT,
})

_register("SD3Transformer2DModel", {
    "pos_embed.proj": PATCH,
    "time_text_embed.*": TIME,
    "context_embedder": TEXT,
    "transformer_blocks.*.norm1.linear": MOD,
    "transformer_blocks.*.norm1_context.linear": MOD,
    "norm_out.linear": MOD,
    "proj_out": OUT,
})

_register("FluxTransformer2DModel", {
    "x_embedder": PATCH,
    "time_text_embed.*": TIME,
    "context_embedder": TEXT,
    "transformer_blocks.*.norm1.linear": MOD,
    "transformer_blocks.*.norm1_context.linear": MOD,
    "single_transformer_blocks.*.norm.linear": MOD,
    "norm_out.linear": MOD,
    "proj_out": OUT,  # not single_transformer_blocks.*.proj_out, a block's attention+MLP output
})

_register("Flux2Transformer2DModel", {
    "x_embedder": PATCH,
    "time_guidance_embed.*": TIME,
    "context_embedder": TEXT,
    "double_stream_modulation_*.linear": MOD + " (shared by all double-stream blocks)",
    "single_stream_modulation.linear": MOD + " (shared by all single-stream blocks)",
    "norm_out.linear": MOD,
    "proj_out": OUT,
})

_register("SanaTransformer2DModel", {
    "patch_embed.proj": PATCH,
    "time_embed.*": TIME + "; ends in the adaLN-single modulation linear shared by all blocks",
    "caption_projection.*": TEXT,
    "transformer_blocks.*.ff.conv_depth": ("depthwise 3x3 conv of the GLUMBConv feed-forward: 9 "
                                           "weights per channel quantize badly, compute is tiny"),
    "proj_out": OUT,
})

_register("QwenImageTransformer2DModel", {
    "img_in": PATCH,
    "time_text_embed.*": TIME,
    "txt_in": TEXT,
    "transformer_blocks.*.img_mod.*": MOD,
    "transformer_blocks.*.txt_mod.*": MOD,
    "norm_out.linear": MOD,
    "proj_out": OUT,
})

_register("CogVideoXTransformer3DModel", {
    "patch_embed.proj": PATCH,
    "patch_embed.text_proj": TEXT,
    "time_embedding.*": TIME,
    "ofs_embedding.*": TIME + " (CogVideoX 1.5 image-to-video offset)",
    "transformer_blocks.*.norm1.linear": MOD,
    "transformer_blocks.*.norm2.linear": MOD,
    "norm_out.linear": MOD,
    "proj_out": OUT,
})

_register("WanTransformer3DModel", {
    # a Conv3d, which vqz does not quantize today; the rule keeps it 16-bit once it does
    "patch_embedding": PATCH,
    "condition_embedder.time_embedder.*": TIME,
    "condition_embedder.time_proj": MOD + " (shared by all blocks)",
    "condition_embedder.text_embedder.*": TEXT,
    "condition_embedder.image_embedder.*": ("CLIP image-token projection (image-to-video): "
                                            "encoder hidden states with outliers, few tokens"),
    "proj_out": OUT,
})
