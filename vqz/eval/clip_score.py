"""CLIP score of generated images against their prompts (Hessel et al. 2021, as torchmetrics
computes it): 100 · max(cos(image embedding, text embedding), 0), with a transformers CLIP model."""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..pipelines.optional import require
from .features import MetricUnavailable, clean_resize

DEFAULT_CLIP = "openai/clip-vit-large-patch14"


def clip_scorer(model_id: str = DEFAULT_CLIP, device="cpu") -> Callable:
    """score(images [B, 3, H, W] in [0, 1], prompts [B]) -> CLIP scores [B]. Raises
    MetricUnavailable when the model cannot be loaded (no weights offline)."""
    transformers = require("transformers", "eval")
    try:
        model = transformers.CLIPModel.from_pretrained(model_id).eval().to(device)
        tokenizer = transformers.AutoTokenizer.from_pretrained(model_id)
    except OSError as e:
        reason = str(e).strip().splitlines()[0]
        raise MetricUnavailable(f"cannot load the CLIP model {model_id!r} ({reason}); pass a local "
                                f"CLIP folder (CLIPModel and its tokenizer)") from e
    from transformers.utils.constants import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    side = model.config.vision_config.image_size
    mean = torch.tensor(OPENAI_CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_CLIP_STD, device=device).view(1, 3, 1, 1)
    max_tokens = model.config.text_config.max_position_embeddings

    @torch.inference_mode()
    def score(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        pixels = (_resize_and_crop(images.to(device), side) - mean) / std
        tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=max_tokens,
                           return_tensors="pt").to(device)
        image = _embedding(model.get_image_features(pixel_values=pixels))
        text = _embedding(model.get_text_features(**tokens))
        return 100 * F.cosine_similarity(image, text, dim=-1).clamp(min=0)

    return score


def _resize_and_crop(images: torch.Tensor, side: int) -> torch.Tensor:
    """CLIP's preprocessing: the shorter side resized to `side` (clean resize), then the centre
    `side` x `side` crop."""
    h, w = images.shape[-2:]
    scale = side / min(h, w)
    resized = clean_resize(images, (max(side, round(h * scale)), max(side, round(w * scale))))
    top, left = (resized.shape[-2] - side) // 2, (resized.shape[-1] - side) // 2
    return resized[..., top:top + side, left:left + side]


def _embedding(output) -> torch.Tensor:
    # transformers 5 returns a model output whose pooled embedding is the projection
    return output if isinstance(output, torch.Tensor) else output.pooler_output
