"""The project's small reference classifier (DESIGN §5.2): a timm ViT for CIFAR-10, and its weights.

A timm `VisionTransformer` for 32x32 RGB images (patch 4: 64 patch tokens plus the class token).
`samples/train_vit.py` trains it on 8000 images of $VQZ_DATA/cifar10/cifar10_test.npz and
saves fp16 weights into `samples/reference/vit/`, installed as the package data `vqz.reference`.
2000 images (the last 200 of each class, `cifar10_split`) are held out, so that a quantized model
can be measured against its own full-precision self by top-1 on images neither saw in training.

The model takes images normalized with the CIFAR-10 mean/std (`preprocess`). Its `pretrained_cfg`
carries the same numbers, so timm's `resolve_data_config` / `create_transform` give the right
preprocessing for a 32x32 input (no resize, no crop: crop_pct 1.0).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .optional import require
from .reference import reference_dir

NUM_CLASSES = 10
HELD_OUT = 2000
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

# Width 256 keeps every matrix a multiple of 128 (qkv 256x768, mlp 256x1024); ~4.8M parameters.
VIT_CONFIG = {
    "img_size": 32,
    "patch_size": 4,
    "num_classes": NUM_CLASSES,
    "embed_dim": 256,
    "depth": 6,
    "num_heads": 4,
    "mlp_ratio": 4.0,
    "class_token": True,
    "global_pool": "token",
    "drop_path_rate": 0.1,  # training only; inactive in eval mode
    "pretrained_cfg": {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "crop_pct": 1.0,
        "crop_mode": "center",
        "mean": CIFAR10_MEAN,
        "std": CIFAR10_STD,
        "num_classes": NUM_CLASSES,
    },
}

VIT_DIR = "vit"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
TRAIN_COMMAND = ("python samples/train_vit.py --out samples/reference --minutes 4 "
                 "--data $VQZ_DATA/cifar10/cifar10_test.npz")


def build_vit(config: dict | None = None):
    """A randomly initialised timm VisionTransformer: images [B, 3, 32, 32] (normalized, see
    `preprocess`) -> logits [B, 10]. `config` overrides entries of VIT_CONFIG."""
    timm_vit = require("timm.models.vision_transformer", "vision")
    kwargs = {**VIT_CONFIG, **(config or {})}
    pretrained_cfg = dict(kwargs.pop("pretrained_cfg"))
    for key in ("input_size", "mean", "std"):  # lists after JSON
        pretrained_cfg[key] = tuple(pretrained_cfg[key])
    model = timm_vit.VisionTransformer(**kwargs)
    model.pretrained_cfg = model.default_cfg = pretrained_cfg
    return model


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 images [B, 3, 32, 32] -> float32 model input, normalized with the CIFAR-10 mean/std."""
    mean = torch.tensor(CIFAR10_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD, device=images.device).view(1, 3, 1, 1)
    return (images.float() / 255 - mean) / std


def cifar10_split(path: str | Path, held_out: int = HELD_OUT):
    """(train images, train labels, held-out images, held-out labels) from a CIFAR-10 npz
    (x uint8 [N, 32, 32, 3], y). Images are uint8 [n, 3, 32, 32], labels int64 [n].

    The split is fixed and stratified: of each class, its last images in file order are held out,
    `held_out` in all in proportion to the class sizes (200 of each class for the 10k test split).
    The npz is sorted by class, so simply the last `held_out` images would be classes 8 and 9 only.
    """
    data = np.load(path)
    labels = np.asarray(data["y"]).reshape(-1).astype(np.int64)
    if not 0 < held_out < len(labels):
        raise ValueError(f"held_out={held_out} must be in 1..{len(labels) - 1}")
    is_held = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        is_held[idx[len(idx) - round(held_out * len(idx) / len(labels)):]] = True
    images = torch.from_numpy(data["x"]).permute(0, 3, 1, 2)
    held, train = torch.from_numpy(is_held), torch.from_numpy(~is_held)
    labels = torch.from_numpy(labels)
    return images[train].contiguous(), labels[train], images[held].contiguous(), labels[held]


@torch.no_grad()
def top1(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1] of `model` on uint8 images [N, 3, 32, 32], on the model's device
    and in its dtype."""
    param = next(model.parameters())
    correct = 0
    for x, y in zip(images.split(batch_size), labels.split(batch_size)):
        logits = model(preprocess(x.to(param.device)).to(param.dtype))
        correct += (logits.argmax(1).cpu() == y.cpu()).sum().item()
    return correct / len(images)


def save_vit(model, folder: str | Path, config: dict | None = None) -> Path:
    """fp16 weights (model.safetensors) and config.json (VIT_CONFIG with `config`) into `folder`."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, folder / WEIGHTS_NAME)
    (folder / CONFIG_NAME).write_text(json.dumps({**VIT_CONFIG, **(config or {})}, indent=2) + "\n")
    return folder


def load_reference_vit(root: str | Path | None = None):
    """The reference ViT in float32, eval mode, on the CPU, from `root/vit/` (default: the committed
    weights in reference_dir())."""
    from safetensors.torch import load_file

    folder = Path(root if root is not None else reference_dir()) / VIT_DIR
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"no weights for the reference ViT in {folder}. Train them on a GPU with "
            f"`{TRAIN_COMMAND}` and commit samples/reference/{VIT_DIR}/")
    config = json.loads((folder / CONFIG_NAME).read_text())
    model = build_vit(config)
    state = {k: v.float() for k, v in load_file(folder / WEIGHTS_NAME).items()}
    model.load_state_dict(state)
    return model.eval()
