"""Feature extractors for FID/KID: callables images [B, 3, H, W] float in [0, 1] -> features [B, D].

Built-in extractors, named by a spec string:
- ``inception``: the FID Inception-v3 (TensorFlow weights, 2048-d pool features) that torchmetrics'
  FrechetInceptionDistance uses, through torch-fidelity; its weights download once.
- ``inception:WEIGHTS.pth``: the same network from a local copy of those weights (offline machines).
- ``timm:MODEL_NAME[:CHECKPOINT]``: the pooled features (``num_classes=0``) of a timm model, with its
  pretrained weights or a local state dict, normalized with the model's own mean/std.

Every extractor resizes with `clean_resize` to its input size, the whole image without a crop:
FID compares the full images, and clean-fid (Parmar et al. 2022) showed that aliased resizing moves
FID by more than many of the differences it is used to measure.
"""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from ..pipelines.loading import read_state_dict
from ..pipelines.optional import require

SPECS = "inception, inception:WEIGHTS.pth or timm:MODEL_NAME[:CHECKPOINT]"


class FeatureExtractor(Protocol):
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """images [B, 3, H, W] float in [0, 1] (any H, W) -> features [B, D]."""


class MetricUnavailable(RuntimeError):
    """A metric's package or weights cannot be had on this machine; the message gives the reason
    and what to pass instead. The metric is reported as skipped, the others still run."""


def clean_resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, C, H, W] in [0, 1] -> [B, C, *size]: antialiased bicubic (PIL's filter), clamped back
    to [0, 1] because bicubic overshoots at edges; unchanged when already at `size`."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode="bicubic", align_corners=False,
                         antialias=True).clamp(0, 1)


class InceptionFeatures:
    """FID Inception-v3 pool features [B, 2048] (torchmetrics' NoTrainInceptionV3)."""

    size = (299, 299)

    def __init__(self, weights: str | None = None, device="cpu"):
        if weights is not None and not Path(weights).is_file():
            raise FileNotFoundError(f"Inception weights {weights} do not exist; pass the path of "
                                    f"a downloaded weights-inception-2015-12-05-6726825d.pth")
        try:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
            from torchmetrics.image.fid import NoTrainInceptionV3
        except ImportError as e:
            raise MetricUnavailable(f"torchmetrics and torch-fidelity are needed for the Inception "
                                    f"features ({e}); pip install 'vqz[eval]', or pass --features "
                                    f"timm:MODEL_NAME:CHECKPOINT") from e
        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                     feature_extractor_weights_path=weights)
        except Exception as e:  # download refused, no network, truncated file in the hub cache
            if weights is not None:
                raise
            raise MetricUnavailable(f"the FID Inception weights could not be downloaded "
                                    f"({type(e).__name__}: {e}); pass --features "
                                    f"inception:WEIGHTS.pth with a local copy of {URL_INCEPTION_V3}, "
                                    f"or --features timm:MODEL_NAME:CHECKPOINT") from e
        self.device = torch.device(device)
        self.net = net.to(self.device)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        # the network takes uint8; at 299x299 its own internal resize is the identity
        pixels = (clean_resize(images.to(self.device), self.size) * 255).round().to(torch.uint8)
        return self.net(pixels)


class TimmFeatures:
    """Pooled pre-logits features [B, num_features] of a timm model in eval mode."""

    def __init__(self, name: str, checkpoint: str | None = None, device="cpu"):
        timm = require("timm", "vision")
        from timm.data import resolve_data_config

        if not timm.list_models(name.split(".")[0]):
            raise ValueError(f"unknown timm model {name!r} in --features timm:{name}; see "
                             f"timm.list_models()")
        if checkpoint is None:
            try:
                model = timm.create_model(name, pretrained=True, num_classes=0)
            except Exception as e:  # no network, no weights published for this name
                raise MetricUnavailable(f"no pretrained weights for timm model {name!r} could be "
                                        f"loaded ({type(e).__name__}: {str(e)[:200]}); pass "
                                        f"--features timm:{name}:CHECKPOINT") from e
        else:
            model = timm.create_model(name, pretrained=False, num_classes=0)
            _load_without_head(model, read_state_dict(checkpoint), f"{checkpoint} ({name})")
        config = resolve_data_config({}, model=model)
        self.device = torch.device(device)
        self.model = model.eval().to(self.device)
        self.size = tuple(config["input_size"][1:])
        self.mean = torch.tensor(config["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(config["std"], device=self.device).view(1, 3, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = clean_resize(images.to(self.device), self.size)
        return self.model((x - self.mean) / self.std)


def _load_without_head(model, state: dict, what: str) -> None:
    """Load a full classifier checkpoint into a headless (num_classes=0) timm model: the classifier
    weights are the only keys allowed to go unused, so checkpoints of any class count fit."""
    heads = model.pretrained_cfg.get("classifier") or ()
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    fix = "pass a checkpoint of that architecture"
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches raise even when not strict
        raise ValueError(f"the checkpoint {what} does not fit the model ({str(e)[:300]}); "
                         f"{fix}") from e
    stray = [k for k in unexpected if not k.startswith(tuple(f"{h}." for h in heads))]
    if missing or stray:
        raise ValueError(f"the checkpoint {what} does not fit the model: missing keys "
                         f"{missing[:3]}, unexpected keys {stray[:3]}; {fix}")


def feature_extractor(spec: str, device="cpu") -> FeatureExtractor:
    """The extractor a spec string names (see the module docstring). Raises ValueError for an
    unknown spec, MetricUnavailable when its package or weights cannot be had here."""
    kind, _, arg = spec.partition(":")
    if kind == "inception":
        return InceptionFeatures(arg or None, device)
    if kind == "timm" and arg:
        name, _, checkpoint = arg.partition(":")
        return TimmFeatures(name, checkpoint or None, device)
    raise ValueError(f"unknown --features value {spec!r}; use {SPECS}")
