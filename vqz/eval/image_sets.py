"""Compare a folder of test images with a folder of reference images (`vqz eval images`).

Images are paired by sorted file name (recursive, so sub-folders work): PSNR, SSIM and LPIPS are
paired metrics, averaged over pairs; FID and KID compare the two sets as distributions. A video given
as a folder of frame images is just images here (frame-wise metrics); video files are not read.
Metrics whose package or weights are missing are reported as skipped with the reason; the others
still run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from ..calib.images import image_files
from .features import FeatureExtractor, MetricUnavailable, feature_extractor
from .fid import check_kid_options, frechet_distance, kernel_inception_distance
from .images import psnr, ssim
from .perceptual import LPIPS_MIN_SIDE, lpips_distance

SSIM_MIN_SIDE = 11  # its Gaussian window, valid region only


class Pair(NamedTuple):
    ref: Path
    test: Path
    size: tuple[int, int]  # (width, height) in pixels, the same for both


def paired_files(ref, test) -> list[Pair]:
    """The image pairs by sorted file name; ValueError when the folders are missing or
    empty, hold different numbers of images, or a pair differs in size."""
    ref, test = Path(ref), Path(test)
    refs = image_files(ref, "reference folder (--ref)")
    tests = image_files(test, "test folder (--test)")
    if len(refs) != len(tests):
        ref_names = {str(f.relative_to(ref)) for f in refs}
        test_names = {str(f.relative_to(test)) for f in tests}
        raise ValueError(f"the reference folder {ref} holds {len(refs)} images but the test folder "
                         f"{test} holds {len(tests)}; images are paired by sorted file name, so "
                         f"both need the same number (only in reference: "
                         f"{sorted(ref_names - test_names)[:3]}, only in test: "
                         f"{sorted(test_names - ref_names)[:3]})")
    from PIL import Image

    pairs = []
    for r, t in zip(refs, tests):
        with Image.open(r) as a, Image.open(t) as b:  # reads headers only
            if a.size != b.size:
                raise ValueError(f"{r} is {a.size[0]}x{a.size[1]} but its pair {t} is "
                                 f"{b.size[0]}x{b.size[1]}; paired images must have the same size "
                                 f"(resize the test images to the reference size)")
            if min(a.size) < SSIM_MIN_SIDE:
                raise ValueError(f"{r} is {a.size[0]}x{a.size[1]}; SSIM needs images of at least "
                                 f"{SSIM_MIN_SIDE}x{SSIM_MIN_SIDE} pixels")
            pairs.append(Pair(r, t, a.size))
    return pairs


def load_image(path) -> torch.Tensor:
    """An image file as RGB float [3, H, W] in [0, 1]."""
    from PIL import Image

    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"))
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float() / 255


def _size_groups(images: list[torch.Tensor]) -> list[list[int]]:
    """Indices of the images grouped by shape, so each group stacks into one batch."""
    groups: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(tuple(image.shape), []).append(i)
    return list(groups.values())


def _optional(build: Callable, key: str, skipped: dict):
    """build(), or None with the reason recorded under skipped[key] when it is unavailable."""
    try:
        return build()
    except MetricUnavailable as e:
        skipped[key] = str(e)
        return None


def _extractor_for(features, pairs: list[Pair], device) -> FeatureExtractor:
    """The FID/KID feature extractor, unavailable for a single pair (no covariance from one
    image)."""
    extract = features if callable(features) else feature_extractor(features, device)
    if len(pairs) < 2:
        raise MetricUnavailable(f"FID and KID compare sets and need at least 2 images each; got "
                                f"{len(pairs)}")
    return extract


def _lpips_for(pairs: list[Pair], device):
    """LPIPS-AlexNet, unavailable when an image is too small for its pooling layers."""
    smallest = min(pairs, key=lambda p: min(p.size))
    if min(smallest.size) < LPIPS_MIN_SIDE:
        raise MetricUnavailable(f"LPIPS-AlexNet needs images of at least {LPIPS_MIN_SIDE}x"
                                f"{LPIPS_MIN_SIDE} pixels; {smallest.ref} is "
                                f"{smallest.size[0]}x{smallest.size[1]}")
    return lpips_distance(device)


def _set_metrics(ref_features, test_features, name: str, kid_subset_size: int, kid_subsets: int,
                 seed: int) -> dict:
    """{"fid": ..., "kid": ...} records of two feature sets [N, D]."""
    fid = frechet_distance(ref_features, test_features)
    kid = kernel_inception_distance(ref_features, test_features, kid_subset_size, kid_subsets, seed)
    return {"fid": {"value": fid, "features": name},
            "kid": {"value": kid["mean"], "std": kid["std"], "subset_size": kid["subset_size"],
                    "subsets": kid["subsets"], "features": name}}


def evaluate_images(ref, test, features: str | FeatureExtractor = "inception",
                    perceptual: Callable | None = None, batch_size: int = 32, device=None,
                    kid_subset_size: int = 1000, kid_subsets: int = 100, seed: int = 0,
                    progress: bool = True) -> dict:
    """PSNR, SSIM, LPIPS (paired) and FID, KID (unpaired) of the images in `test` against `ref`.

    features: a spec string (see vqz.eval.features) or a callable images [B, 3, H, W] in [0, 1] ->
        [B, D]; it is called once per batch and image size, for each set.
    perceptual: a callable (test, ref) [B, 3, H, W] in [0, 1] -> [B] in place of LPIPS-AlexNet.

    PSNR is in dB per pair with the MSE floored at 1e-12 (identical images give 120 dB), then
    averaged. Returns {"ref", "test", "count", "features", "metrics": {name: {"value", ...} or
    {"skipped": reason}}, "pairs": [per-pair names and paired metrics]}.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    check_kid_options(kid_subset_size, kid_subsets)
    ref, test = Path(ref).resolve(), Path(test).resolve()
    pairs = paired_files(ref, test)  # bad folders fail before any network is built
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    skipped: dict[str, str] = {}
    name = features if isinstance(features, str) else getattr(features, "__name__",
                                                               type(features).__name__)
    extract = _optional(lambda: _extractor_for(features, pairs, device), "fid", skipped)
    perceptual = perceptual or _optional(lambda: _lpips_for(pairs, device), "lpips", skipped)

    records, ref_features, test_features = [], [], []
    batches = [pairs[i:i + batch_size] for i in range(0, len(pairs), batch_size)]
    with torch.inference_mode():
        for batch in tqdm(batches, desc="images", unit="batch", disable=not progress):
            refs = [load_image(pair.ref) for pair in batch]
            tests = [load_image(pair.test) for pair in batch]
            rows = [{"ref": str(pair.ref.relative_to(ref)), "test": str(pair.test.relative_to(test))}
                    for pair in batch]
            for group in _size_groups(refs):
                r = torch.stack([refs[i] for i in group]).to(device)
                t = torch.stack([tests[i] for i in group]).to(device)
                values = {"psnr": psnr(t, r), "ssim": ssim(t, r)}
                if perceptual is not None:
                    values["lpips"] = perceptual(t, r)
                for key, per_image in values.items():
                    for i, value in zip(group, per_image.tolist()):
                        rows[i][key] = value
                if extract is not None:
                    ref_features.append(extract(r).cpu())
                    test_features.append(extract(t).cpu())
            records += rows

    metrics = {key: {"value": float(np.mean([row[key] for row in records]))}
               for key in ("psnr", "ssim", "lpips") if key not in skipped}
    metrics["psnr"]["unit"] = "dB"
    if "lpips" in skipped:
        metrics["lpips"] = {"skipped": skipped["lpips"]}
    if "fid" in skipped:
        metrics["fid"] = metrics["kid"] = {"skipped": skipped["fid"]}
    else:
        metrics.update(_set_metrics(torch.cat(ref_features), torch.cat(test_features), name,
                                    kid_subset_size, kid_subsets, seed))
    return {"ref": str(ref), "test": str(test), "count": len(pairs), "features": name,
            "metrics": metrics, "pairs": records}
