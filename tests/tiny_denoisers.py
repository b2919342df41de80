"""Tiny diffusers denoisers with random weights, and example inputs for each.

FAMILIES maps a name to (build, inputs): `build()` returns the real diffusers class from a tiny
config (seeded, eval mode); `inputs(seed)` returns fresh random keyword arguments for its forward.
"""
from __future__ import annotations

import torch

B = 2  # batch


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def _steps(g, high=1000):
    return torch.randint(1, high, (B,), generator=g)


def _build(cls, **config):
    torch.manual_seed(0)
    return cls(**config).eval()


# Channel counts differ at every level, so a split formula that mixes up levels fails.
UNET_CHANNELS = (16, 32, 48)


def sd15_unet():
    from diffusers import UNet2DConditionModel
    return _build(UNet2DConditionModel, sample_size=8, in_channels=4, out_channels=4,
                  block_out_channels=UNET_CHANNELS, layers_per_block=2, norm_num_groups=8,
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=32, attention_head_dim=8)


def sd15_inputs(seed):
    g = _gen(seed)
    return {"sample": _randn(g, B, 4, 8, 8), "timestep": _steps(g),
            "encoder_hidden_states": _randn(g, B, 6, 32)}


def sdxl_unet():
    from diffusers import UNet2DConditionModel
    return _build(UNet2DConditionModel, sample_size=8, in_channels=4, out_channels=4,
                  block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2), cross_attention_dim=32,
                  attention_head_dim=(4, 8), use_linear_projection=True,
                  addition_embed_type="text_time", addition_time_embed_dim=8,
                  projection_class_embeddings_input_dim=16 + 6 * 8)


def sdxl_inputs(seed):
    g = _gen(seed)
    return {"sample": _randn(g, B, 4, 8, 8), "timestep": _steps(g),
            "encoder_hidden_states": _randn(g, B, 6, 32),
            "added_cond_kwargs": {"text_embeds": _randn(g, B, 16),
                                  "time_ids": torch.rand(6, generator=g).repeat(B, 1) * 1024}}


def unet2d():
    from diffusers import UNet2DModel
    return _build(UNet2DModel, sample_size=8, in_channels=3, out_channels=3,
                  block_out_channels=UNET_CHANNELS, layers_per_block=1, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)


def unet2d_inputs(seed):
    g = _gen(seed)
    return {"sample": _randn(g, B, 3, 8, 8), "timestep": _steps(g)}


def unet2d_no_mid():
    from diffusers import UNet2DModel
    return _build(UNet2DModel, sample_size=8, in_channels=3, out_channels=3,
                  block_out_channels=(16, 40), layers_per_block=2, norm_num_groups=8,
                  down_block_types=("DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D"), mid_block_type=None)


def dit():
    from diffusers import DiTTransformer2DModel
    return _build(DiTTransformer2DModel, num_attention_heads=2, attention_head_dim=16,
                  in_channels=4, out_channels=4, num_layers=2, sample_size=8, patch_size=2,
                  num_embeds_ada_norm=10)


def dit_inputs(seed):
    g = _gen(seed)
    return {"hidden_states": _randn(g, B, 4, 8, 8), "timestep": _steps(g),
            "class_labels": torch.randint(0, 10, (B,), generator=g)}


def pixart():
    from diffusers import PixArtTransformer2DModel
    return _build(PixArtTransformer2DModel, num_attention_heads=2, attention_head_dim=16,
                  in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                  cross_attention_dim=32, caption_channels=24)


def pixart_inputs(seed):
    g = _gen(seed)
    return {"hidden_states": _randn(g, B, 4, 8, 8), "encoder_hidden_states": _randn(g, B, 6, 24),
            "timestep": _steps(g), "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def sd3():
    from diffusers import SD3Transformer2DModel
    return _build(SD3Transformer2DModel, sample_size=8, patch_size=2, in_channels=4, out_channels=4,
                  num_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16,
                  pos_embed_max_size=8, dual_attention_layers=(0,), qk_norm="rms_norm")


def sd3_inputs(seed):
    g = _gen(seed)
    return {"hidden_states": _randn(g, B, 4, 8, 8), "encoder_hidden_states": _randn(g, B, 6, 24),
            "pooled_projections": _randn(g, B, 16), "timestep": _steps(g)}


def _ids(rows, cols, axes=3, offset=0):
    """Position ids [rows * cols, axes]: (offset, row, col, 0...) per token, as the Flux pipelines do."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    ids = torch.zeros(rows * cols, axes)
    ids[:, 0], ids[:, -2], ids[:, -1] = offset, r.flatten(), c.flatten()
    return ids


def flux():
    from diffusers import FluxTransformer2DModel
    return _build(FluxTransformer2DModel, patch_size=1, in_channels=16, num_layers=1,
                  num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True,
                  axes_dims_rope=(4, 6, 6))


def flux_inputs(seed):
    g = _gen(seed)
    return {"hidden_states": _randn(g, B, 16, 16), "encoder_hidden_states": _randn(g, B, 6, 24),
            "pooled_projections": _randn(g, B, 16), "timestep": torch.rand(B, generator=g),
            "img_ids": _ids(4, 4), "txt_ids": torch.zeros(6, 3),
            "guidance": torch.full((B,), 3.5) + torch.rand(B, generator=g)}


def flux2():
    from diffusers import Flux2Transformer2DModel
    return _build(Flux2Transformer2DModel, patch_size=1, in_channels=16, num_layers=1,
                  num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=24, timestep_guidance_channels=32,
                  axes_dims_rope=(4, 4, 4, 4), guidance_embeds=True)


def flux2_inputs(seed):
    g = _gen(seed)
    txt = torch.zeros(6, 4)
    txt[:, -1] = torch.arange(6)
    return {"hidden_states": _randn(g, B, 16, 16), "encoder_hidden_states": _randn(g, B, 6, 24),
            "timestep": torch.rand(B, generator=g), "img_ids": _ids(4, 4, axes=4),
            "txt_ids": txt, "guidance": torch.full((B,), 3.5) + torch.rand(B, generator=g)}


def sana():
    from diffusers import SanaTransformer2DModel
    return _build(SanaTransformer2DModel, in_channels=4, out_channels=4, num_attention_heads=2,
                  attention_head_dim=16, num_layers=2, num_cross_attention_heads=2,
                  cross_attention_head_dim=16, cross_attention_dim=32, caption_channels=24,
                  sample_size=8, patch_size=1)


def sana_inputs(seed):
    g = _gen(seed)
    return {"hidden_states": _randn(g, B, 4, 8, 8), "encoder_hidden_states": _randn(g, B, 6, 24),
            "timestep": _steps(g)}


def qwen_image():
    from diffusers import QwenImageTransformer2DModel
    return _build(QwenImageTransformer2DModel, patch_size=2, in_channels=16, out_channels=4,
                  num_layers=2, attention_head_dim=16, num_attention_heads=2,
                  joint_attention_dim=24, axes_dims_rope=(4, 6, 6))


def qwen_image_inputs(seed):
    g = _gen(seed)
    mask = torch.ones(B, 6)
    mask[1, 4:] = 0  # the second prompt is shorter: padding tokens are masked out
    return {"hidden_states": _randn(g, B, 16, 16), "encoder_hidden_states": _randn(g, B, 6, 24),
            "encoder_hidden_states_mask": mask, "timestep": torch.rand(B, generator=g),
            "img_shapes": [[(1, 4, 4)]] * B}


def cogvideox():
    from diffusers import CogVideoXTransformer3DModel
    return _build(CogVideoXTransformer3DModel, num_attention_heads=2, attention_head_dim=16,
                  in_channels=4, out_channels=4, time_embed_dim=32, text_embed_dim=24, num_layers=2,
                  sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
                  temporal_compression_ratio=4, max_text_seq_length=6)


def cogvideox_inputs(seed):
    g = _gen(seed)
    return {"hidden_states": _randn(g, B, 2, 4, 8, 8), "encoder_hidden_states": _randn(g, B, 6, 24),
            "timestep": _steps(g)}


def wan():
    from diffusers import WanTransformer3DModel
    return _build(WanTransformer3DModel, patch_size=(1, 2, 2), num_attention_heads=2,
                  attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24, freq_dim=32,
                  ffn_dim=64, num_layers=2, rope_max_seq_len=32)


def wan_inputs(seed):
    g = _gen(seed)
    return {"hidden_states": _randn(g, B, 4, 3, 8, 8), "timestep": _steps(g),
            "encoder_hidden_states": _randn(g, B, 6, 24)}


FAMILIES = {
    "sd15_unet": (sd15_unet, sd15_inputs),
    "sdxl_unet": (sdxl_unet, sdxl_inputs),
    "unet2d": (unet2d, unet2d_inputs),
    "dit": (dit, dit_inputs),
    "pixart": (pixart, pixart_inputs),
    "sd3": (sd3, sd3_inputs),
    "flux": (flux, flux_inputs),
    "flux2": (flux2, flux2_inputs),
    "sana": (sana, sana_inputs),
    "qwen_image": (qwen_image, qwen_image_inputs),
    "cogvideox": (cogvideox, cogvideox_inputs),
    "wan": (wan, wan_inputs),
}

# the UNets, plus one without a mid block (its first up block reads the last down block's output)
UNETS = {name: FAMILIES[name] for name in ("sd15_unet", "sdxl_unet", "unet2d")}
UNETS["unet2d_no_mid"] = (unet2d_no_mid, unet2d_inputs)
