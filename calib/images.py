"""Calibration images from a folder, preprocessed the way the model's own config says."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def image_files(folder, what: str = "calibration image folder") -> list[Path]:
    """The image files under `folder` (recursive), sorted by path; `what` names the folder's role in
    the errors."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{what} {folder} does not exist; pass a folder of images")
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {folder} "
                         f"({what}); put the image files there or pass another folder")
    return files


def image_batches(folder, model: nn.Module, count: int = 32, batch_size: int = 8) -> list[torch.Tensor]:
    """The first `count` images under `folder` (sorted paths), as [B, 3, H, W] batches preprocessed
    with timm's evaluation transform for `model` (resolve_data_config / create_transform)."""
    from PIL import Image
    from timm.data import create_transform, resolve_data_config

    transform = create_transform(**resolve_data_config({}, model=model))
    files = image_files(folder)[:count]
    images = [transform(Image.open(f).convert("RGB")) for f in files]
    return [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
