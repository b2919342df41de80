"""Monocular depth evaluation: the standard metrics, alignment of relative predictions, a folder
dataset of RGB images with depth maps, and the loop that runs a model over it.

Conventions (those of the Eigen et al. / BTS / Depth Anything evaluation code):
- Depths are in metres. A pixel is valid when min_depth < gt < max_depth, it lies inside the
  dataset's crop, and the prediction there is finite. A depth map of 0 means "no measurement".
- NYUv2: 1e-3..10 m, Eigen crop rows 45:471, cols 41:601 of the 480x640 frame. For other frame
  sizes the crop is scaled proportionally: row = round(45 / 480 * H), etc.
- KITTI: 1e-3..80 m, Garg crop rows int(0.40810811 H):int(0.99189189 H),
  cols int(0.03594771 W):int(0.96405229 W).
- Alignment (fitted on the valid pixels of each image) happens before the prediction is clamped
  to [min_depth, max_depth].
- Over a dataset, metrics are averaged per image (each image's mean over its valid pixels, then
  the mean over images), not per pixel.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DATASETS = {"nyu": (1e-3, 10.0), "kitti": (1e-3, 80.0)}
ALIGNMENTS = ("none", "median", "lstsq", "lstsq-disparity")
METRICS = ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "d1", "d2", "d3")
LOWER_IS_BETTER = {"abs_rel", "sq_rel", "rmse", "rmse_log", "log10"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
DEPTH_SUFFIXES = ("_depth.png", "_depth.npy")


def crop_mask(height: int, width: int, dataset: str) -> torch.Tensor:
    """Bool [H, W]: True inside the dataset's evaluation crop (Eigen for nyu, Garg for kitti)."""
    mask = torch.zeros(height, width, dtype=torch.bool)
    if dataset == "nyu":
        top, bottom = round(45 / 480 * height), round(471 / 480 * height)
        left, right = round(41 / 640 * width), round(601 / 640 * width)
    elif dataset == "kitti":
        top, bottom = int(0.40810811 * height), int(0.99189189 * height)
        left, right = int(0.03594771 * width), int(0.96405229 * width)
    else:
        raise ValueError(f"dataset {dataset!r} is not one of {sorted(DATASETS)}")
    mask[top:bottom, left:right] = True
    return mask


def _lstsq_scale_shift(x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    """(s, t) minimising sum (s x + t - y)^2 over 1-D float64 tensors."""
    a = torch.stack([x, torch.ones_like(x)], dim=1)
    s, t = torch.linalg.lstsq(a, y[:, None]).solution[:, 0].tolist()
    return s, t


def align_prediction(pred: torch.Tensor, gt: torch.Tensor, valid: torch.Tensor, align: str,
                     max_depth: float) -> torch.Tensor:
    """The prediction as metric depth, fitted to gt on the `valid` pixels (all [H, W], float64).

    none: pred is depth already. median: pred * median(gt) / median(pred). lstsq: s pred + t on
    depth. lstsq-disparity: pred is disparity (1/depth up to scale and shift); s pred + t is fitted
    to 1/gt, then inverted (disparities below 1/max_depth are raised to it first, so the inverse is
    finite and at most max_depth).
    """
    if align == "none":
        return pred
    p, g = pred[valid], gt[valid]
    if align == "median":
        return pred * (g.median() / p.median())
    if align == "lstsq":
        s, t = _lstsq_scale_shift(p, g)
        return s * pred + t
    if align == "lstsq-disparity":
        s, t = _lstsq_scale_shift(p, 1.0 / g)
        return 1.0 / (s * pred + t).clamp_min(1.0 / max_depth)
    raise ValueError(f"align {align!r} is not one of {ALIGNMENTS}")


def depth_metrics(pred, gt, *, dataset: str = "nyu", align: str = "none") -> dict[str, float]:
    """Metrics of one image over its valid pixels.

    pred, gt: [H, W] (or [1, H, W]) tensors or arrays of the same size; gt in metres, pred in metres
    (align "none"), depth up to scale ("median", "lstsq") or disparity ("lstsq-disparity").
    Returns {abs_rel, sq_rel, rmse (m), rmse_log, log10, d1, d2, d3 (fractions in [0, 1]),
    valid_pixels}. Raises ValueError when the sizes differ or no pixel is valid.
    """
    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r} is not one of {sorted(DATASETS)}")
    if align not in ALIGNMENTS:
        raise ValueError(f"align {align!r} is not one of {ALIGNMENTS}")
    pred = torch.as_tensor(np.asarray(pred) if not torch.is_tensor(pred) else pred).double()
    gt = torch.as_tensor(np.asarray(gt) if not torch.is_tensor(gt) else gt).double()
    pred, gt = pred.squeeze(), gt.squeeze()
    if pred.shape != gt.shape or gt.dim() != 2:
        raise ValueError(f"prediction {tuple(pred.shape)} and ground truth {tuple(gt.shape)} must "
                         f"be [H, W] maps of the same size; resize the prediction to the depth map")
    lo, hi = DATASETS[dataset]
    valid = (gt > lo) & (gt < hi) & crop_mask(*gt.shape, dataset) & torch.isfinite(pred)
    if not valid.any():
        raise ValueError(f"no valid ground-truth pixel ({lo} < depth < {hi} m inside the "
                         f"{dataset} crop); check the depth units (PNG: millimetres, npy: metres)")
    p = align_prediction(pred, gt, valid, align, hi)[valid].clamp(lo, hi)
    g = gt[valid]
    ratio = torch.maximum(p / g, g / p)
    return {
        "abs_rel": ((p - g).abs() / g).mean().item(),
        "sq_rel": ((p - g) ** 2 / g).mean().item(),
        "rmse": ((p - g) ** 2).mean().sqrt().item(),
        "rmse_log": ((p.log() - g.log()) ** 2).mean().sqrt().item(),
        "log10": (p.log10() - g.log10()).abs().mean().item(),
        **{f"d{k}": (ratio < 1.25 ** k).double().mean().item() for k in (1, 2, 3)},
        "valid_pixels": int(valid.sum()),
    }


class DepthMeter:
    """Averages depth_metrics over images (per-image means, then the mean over images)."""

    def __init__(self):
        self.sums = dict.fromkeys(METRICS, 0.0)
        self.count = 0

    def update(self, metrics: dict) -> None:
        for k in METRICS:
            self.sums[k] += metrics[k]
        self.count += 1

    def compute(self) -> dict[str, float]:
        if not self.count:
            raise ValueError("no image was evaluated")
        return {k: v / self.count for k, v in self.sums.items()}


def read_depth(path) -> np.ndarray:
    """A depth map [H, W] float32 in metres: `*_depth.png` is 16-bit in millimetres, `*_depth.npy`
    is metres. 0 means no measurement."""
    path = Path(path)
    if path.suffix == ".npy":
        depth = np.load(path).astype(np.float32)
    else:
        from PIL import Image
        raw = np.asarray(Image.open(path))
        if raw.dtype not in (np.uint16, np.int32) or raw.ndim != 2:
            raise ValueError(f"{path}: a depth PNG must be single-channel 16-bit in millimetres, "
                             f"got {raw.dtype} with shape {raw.shape}")
        depth = raw.astype(np.float32) / 1000.0
    if depth.ndim != 2:
        raise ValueError(f"{path}: a depth map must be [H, W], got shape {depth.shape}")
    return depth


def _depth_size(path: Path) -> tuple[int, int]:
    """(H, W) of a depth file without reading its pixels."""
    if path.suffix == ".npy":
        return tuple(np.load(path, mmap_mode="r").shape[:2])
    from PIL import Image
    with Image.open(path) as im:
        return im.height, im.width


@dataclass
class DepthPair:
    image: Path
    depth: Path


class DepthFolder:
    """RGB images with depth maps in one folder: `<name>.png|.jpg|.jpeg` paired with
    `<name>_depth.png` (16-bit, millimetres) or `<name>_depth.npy` (float, metres; preferred when
    both exist). Images without a depth map are ignored. Items are (PIL RGB image, depth
    [H, W] float32 tensor in metres), sorted by name. Every pair is checked up front: the depth map
    must have the image's size.
    """

    def __init__(self, folder):
        from PIL import Image

        folder = Path(folder)
        if not folder.is_dir():
            raise ValueError(f"depth data folder {folder} does not exist")
        self.pairs = []
        for image in sorted(folder.iterdir()):
            if image.suffix.lower() not in IMAGE_SUFFIXES or image.stem.endswith("_depth"):
                continue
            depth = next((d for s in reversed(DEPTH_SUFFIXES)
                          if (d := folder / f"{image.stem}{s}").is_file()), None)
            if depth is None:
                continue
            with Image.open(image) as im:
                size = (im.height, im.width)
            if _depth_size(depth) != size:
                raise ValueError(f"depth map {depth.name} is {_depth_size(depth)} (H, W) but its "
                                 f"image {image.name} is {size}; depth maps must match their image")
            self.pairs.append(DepthPair(image, depth))
        if not self.pairs:
            raise ValueError(f"no image/depth pairs in {folder}: expected <name>.png|.jpg with "
                             f"<name>_depth.png (16-bit mm) or <name>_depth.npy (metres)")

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i):
        from PIL import Image
        pair = self.pairs[i]
        return Image.open(pair.image).convert("RGB"), torch.from_numpy(read_depth(pair.depth))


def pixel_values(processor, image) -> torch.Tensor:
    """[1, 3, h, w] model input for one PIL image, through a transformers image processor."""
    return processor(images=image, return_tensors="pt")["pixel_values"]


def evaluate_depth(forward, data: DepthFolder, processor, *, dataset: str = "nyu",
                   align: str = "none", desc: str = "depth eval") -> dict[str, float]:
    """Per-image-averaged metrics of `forward(pixel_values) -> [1, h, w]` over `data`.

    The prediction is resized to the depth map's size (bilinear) before the metrics, one image at a
    time since image sizes may differ.
    """
    from tqdm.auto import tqdm

    meter = DepthMeter()
    for image, gt in tqdm(data, desc=desc, unit="image", leave=False):
        pred = forward(pixel_values(processor, image)).float()
        pred = F.interpolate(pred[:, None], size=gt.shape, mode="bilinear", align_corners=False)
        meter.update(depth_metrics(pred[0, 0], gt, dataset=dataset, align=align))
    return meter.compute()


def format_table(columns: dict[str, dict[str, float]]) -> str:
    """A text table: one row per metric, one column per model, plus the last minus the first."""
    names = list(columns)
    header = ["metric", *names, "delta"] if len(names) > 1 else ["metric", *names]
    rows = [header]
    for k in METRICS:
        values = [columns[n][k] for n in names]
        cells = [k + (" (lower better)" if k in LOWER_IS_BETTER else " (higher better)")]
        cells += [_fmt(v) for v in values]
        if len(values) > 1:
            cells.append(f"{values[-1] - values[0]:+.4f}")
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(v: float) -> str:
    return "nan" if math.isnan(v) else f"{v:.4f}"


def load_depth_model(model_id):
    """(model in eval mode, image processor) from a hub id or a save_pretrained folder, through
    transformers' AutoModelForDepthEstimation / AutoImageProcessor."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForDepthEstimation
    from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES

    config = AutoConfig.from_pretrained(model_id)
    if config.model_type not in MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES:
        raise ValueError(f"{model_id} is a {config.model_type!r} model, not a depth estimator; "
                         f"`vqz eval depth` needs one of: "
                         f"{', '.join(sorted(MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES))} "
                         f"(e.g. depth-anything/Depth-Anything-V2-Small-hf, Intel/dpt-large)")
    model = AutoModelForDepthEstimation.from_pretrained(model_id).eval()
    return model, AutoImageProcessor.from_pretrained(model_id)


def depth_eval(model_id, data, preset: str, *, dataset: str = "nyu", align: str | None = None,
               calib_count: int = 8) -> dict:
    """Full precision and `preset`-quantized metrics of a depth model over a DepthFolder.

    Calibration uses the first `calib_count` images of `data` (they are evaluated too) when the
    preset has static activation scales. align None
    picks the model's natural one (pipelines.depth.default_alignment). Returns {model, preset,
    dataset, align, images, calib_images, averaging, full_precision: {metric: value},
    quantized: {...}}.
    """
    import vqz

    from ..config import check_preset_name, resolve_config
    from ..pipelines import adapter_for
    from ..pipelines.depth import default_alignment, depth_forward

    check_preset_name(preset)  # fail on a bad name before loading anything
    if dataset not in DATASETS:
        raise ValueError(f"dataset {dataset!r} is not one of {sorted(DATASETS)}")
    folder = DepthFolder(data)
    model, processor = load_depth_model(model_id)
    cfg = resolve_config(preset, adapter_for(model).family)
    align = align or default_alignment(model)
    if align not in ALIGNMENTS:
        raise ValueError(f"align {align!r} is not one of {ALIGNMENTS}")
    # dynamic-activation presets (w8a8, w4a4) have nothing to calibrate
    n = min(calib_count, len(folder)) if cfg.needs_calibration else 0
    calib = [{"pixel_values": pixel_values(processor, folder[i][0])} for i in range(n)]
    quantized = vqz.quantize(copy.deepcopy(model), preset, calib=calib or None)
    results = {}
    for name, m in (("full_precision", model), ("quantized", quantized)):
        results[name] = evaluate_depth(lambda x, m=m: depth_forward(m, x), folder, processor,
                                       dataset=dataset, align=align, desc=f"depth eval ({name})")
    return {"model": str(model_id), "preset": preset, "dataset": dataset, "align": align,
            "images": len(folder), "calib_images": n, "averaging": "per image", **results}
