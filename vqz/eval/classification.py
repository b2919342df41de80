"""ImageNet-style top-k accuracy of a timm model, full precision against quantized.

Preprocessing follows timm's validation protocol (timm/validate.py): the data config comes from the
model's own pretrained config, at its test size and crop when it declares them.
"""
from __future__ import annotations

import copy
import csv
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm.auto import tqdm

from ..calib.images import IMAGE_SUFFIXES, image_files
from ..calib.sources import device_of

LAYOUT = "<root>/<class>/<image>.JPEG (ImageFolder: one subfolder per class, sorted names = class index)"
CSV_COLUMNS = ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
               "interpolation", "preset"]


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


class ImageFolderSet(Dataset):
    """(image, class index) pairs from an ImageFolder tree. Classes are the sorted subfolder names,
    including empty ones, so a subset of ImageNet's folders keeps the canonical indices only when all
    1000 class folders are present."""

    def __init__(self, root, transform=None):
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist (expected {LAYOUT})")
        self.root, self.transform = root, transform
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        self.samples = [(f, i) for i, name in enumerate(self.classes)
                        for f in sorted(p for p in (root / name).rglob("*") if _is_image(p))]
        if not self.samples:
            loose = any(_is_image(p) for p in root.iterdir())
            what = ("has images directly in it but no class subfolders" if loose
                    else "holds no images in class subfolders")
            raise ValueError(f"{root} {what}; expected {LAYOUT}")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index):
        from PIL import Image

        path, target = self.samples[index]
        image = Image.open(path).convert("RGB")
        return (self.transform(image) if self.transform else image), target


@torch.no_grad()
def evaluate_top_k(model: nn.Module, loader, ks=(1, 5), progress: bool = True) -> dict:
    """{"top1": %, "top5": %, ..., "count": n} of `model` over (images, targets) batches."""
    device = device_of(model)
    correct = dict.fromkeys(ks, 0)
    count = 0
    model.eval()
    for images, targets in tqdm(loader, desc="eval", unit="batch", disable=not progress, leave=False):
        logits = model(images.to(device))
        targets = torch.as_tensor(targets, device=logits.device)
        top = logits.topk(min(max(ks), logits.shape[-1]), dim=-1).indices
        hits = top == targets[:, None]
        for k in ks:
            correct[k] += hits[:, :k].any(dim=-1).sum().item()
        count += targets.numel()
    if count == 0:
        raise ValueError("the evaluation data is empty")
    return {**{f"top{k}": 100.0 * correct[k] / count for k in ks}, "count": count}


def data_config(model: nn.Module) -> dict:
    """timm's evaluation data config for `model` (input size, crop_pct, crop_mode, interpolation,
    mean/std) from its pretrained config; test_input_size/test_crop_pct win, as in timm's validate."""
    from timm.data import resolve_data_config

    return resolve_data_config({}, model=model, use_test_size=True)


def _calibration(folder, transform, count: int, batch_size: int) -> list[torch.Tensor]:
    """The first `count` images under `folder` (sorted paths, as calib.images.image_batches) with the
    evaluation transform, so the calibrated ranges are those of the evaluated resolution."""
    from PIL import Image

    images = [transform(Image.open(f).convert("RGB")) for f in image_files(folder)[:count]]
    return [torch.stack(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]


def imagenet_eval(model_name: str, data, preset: str, checkpoint=None, calib_data=None,
                  calib_count: int = 32, batch_size: int = 32, limit: int | None = None,
                  device: str | None = None, workers: int = 2, progress: bool = True) -> dict:
    """Top-1/top-5 of a timm model (name or folder, optional checkpoint) on an ImageFolder, in full
    precision and after quantizing a copy with `preset`.

    Calibration (when the preset needs it or `calib_data` is given) uses `calib_data` or the first
    `calib_count` images of `data`. `limit` evaluates that many images, evenly spaced over the sorted
    list (deterministic).
    """
    import vqz
    from timm.data import create_transform

    from ..config import check_preset_name, resolve_config
    from ..pipelines import adapter_for
    from ..pipelines.loading import load_model

    check_preset_name(preset)  # a bad name fails before any loading
    if batch_size < 1 or calib_count < 1 or (limit is not None and limit < 1):
        raise ValueError("batch_size, calib_count and limit must be positive integers")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dataset = ImageFolderSet(data)  # a bad folder fails before the model loads
    model, _ = load_model(model_name, checkpoint)
    config = data_config(model)
    dataset.transform = transform = create_transform(**config)
    num_classes = getattr(model, "num_classes", None)
    if num_classes and len(dataset.classes) != num_classes:
        raise ValueError(f"{data} has {len(dataset.classes)} class folders but {model_name} predicts "
                         f"{num_classes} classes; labels are the sorted folder indices, so all "
                         f"{num_classes} class folders must be present (empty ones are fine)")
    if limit is not None and limit < len(dataset):
        # evenly spaced over the sorted images, so a subset spans all classes rather than the first few
        dataset = Subset(dataset, [i * len(dataset) // limit for i in range(limit)])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.startswith("cuda"))
    param_count = sum(p.numel() for p in model.parameters())

    model.to(device)
    full = evaluate_top_k(model, loader, progress=progress)
    calib = calib_source = None
    if resolve_config(preset, adapter_for(model).family).needs_calibration or calib_data is not None:
        calib_source = Path(calib_data if calib_data is not None else data)
        calib = _calibration(calib_source, transform, calib_count, batch_size)
    quantized = vqz.quantize(copy.deepcopy(model), preset, calib=calib)
    del model
    quant = evaluate_top_k(quantized, loader, progress=progress)
    return {
        "model": model_name, "preset": preset, "count": full["count"], "param_count": param_count,
        "data_config": {k: list(v) if isinstance(v, tuple) else v for k, v in config.items()},
        "full_precision": {k: full[k] for k in ("top1", "top5")},
        "quantized": {k: quant[k] for k in ("top1", "top5")},
        "calibration": None if calib is None else {"data": str(calib_source),
                                                   "count": sum(len(b) for b in calib)},
    }


def result_rows(result: dict) -> list[dict]:
    """The two CSV rows (full precision, quantized) of an imagenet_eval result."""
    cfg = result["data_config"]
    rows = []
    for key, preset in (("full_precision", "fp"), ("quantized", result["preset"])):
        top1, top5 = result[key]["top1"], result[key]["top5"]
        rows.append({"model": result["model"], "top1": round(top1, 3), "top1_err": round(100 - top1, 3),
                     "top5": round(top5, 3), "top5_err": round(100 - top5, 3),
                     "param_count": round(result["param_count"] / 1e6, 2),
                     "img_size": cfg["input_size"][-1], "crop_pct": cfg["crop_pct"],
                     "interpolation": cfg["interpolation"], "preset": preset})
    return rows


def write_results_csv(path, rows) -> Path:
    """timm-style results CSV (param_count in millions), one row per dict, plus a preset column."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_results(result: dict) -> str:
    """Full precision and quantized side by side, with the deltas."""
    fp, q = result["full_precision"], result["quantized"]
    cfg = result["data_config"]
    lines = [f"{result['model']} on {result['count']} images (input {cfg['input_size'][-1]}, "
             f"crop_pct {cfg['crop_pct']}, {cfg['interpolation']})",
             f"{'':16s}{'top-1':>9s}{'top-5':>9s}",
             f"{'full precision':16s}{fp['top1']:9.2f}{fp['top5']:9.2f}",
             f"{result['preset']:16s}{q['top1']:9.2f}{q['top5']:9.2f}",
             f"{'delta':16s}{q['top1'] - fp['top1']:+9.2f}{q['top5'] - fp['top5']:+9.2f}"]
    return "\n".join(lines)
