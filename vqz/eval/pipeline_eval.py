"""`vqz eval pipeline`: generate full-precision and quantized image sets from the same prompts and
seeds, then compare them (PSNR/SSIM/LPIPS per pair, FID/KID between the sets) in an HTML report.

Generation is sharded over the processes of `accelerate launch` (each renders its share of the
images on its own GPU); one process computes the metrics.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..calib.pipeline import inner_progress_bars_off
from .clip_score import DEFAULT_CLIP, clip_scorer
from .features import MetricUnavailable
from .generation import generate
from .image_sets import evaluate_images, load_image
from .report import write_report


def render_set(pipe, prompts: list[str], n: int, folder: Path, state, seed: int = 0,
               **options) -> None:
    """Images 0..n-1 of the set into `folder`: image i from prompts[i % len(prompts)] with seed
    seed + i, saved as <i>.png (a video as <i>/<frame>.png); this process renders its share."""
    folder.mkdir(parents=True, exist_ok=True)
    with state.split_between_processes(list(range(n))) as mine, inner_progress_bars_off(pipe):
        for i in tqdm(mine, desc=f"{folder.name} images", unit="image",
                      disable=not state.is_local_main_process):
            images, video = generate(pipe, prompts[i % len(prompts)], seed + i, **options)
            if video:
                (folder / f"{i:05d}").mkdir(exist_ok=True)
                for f, frame in enumerate(images):
                    frame.save(folder / f"{i:05d}" / f"{f:04d}.png")
            else:
                images[0].save(folder / f"{i:05d}.png")
    state.wait_for_everyone()


def evaluate_pipeline(pipe, quantize, prompts: list[str], n: int, out, *, features="inception",
                      clip=DEFAULT_CLIP, seed: int = 0, device=None, **options) -> dict | None:
    """Render the full-precision set (out/reference), quantize the pipeline in place with
    `quantize(pipe)`, render the quantized set (out/quantized) from the same prompts and seeds,
    and write out/metrics.json and out/report.html: the image-set metrics of evaluate_images and
    the CLIP score of each set against its prompts (`clip`: a CLIP model id or folder; skipped
    with the reason when it cannot be loaded). Returns the metrics on the main process."""
    from accelerate import PartialState

    if not prompts:
        raise ValueError("no prompts to generate from; give a prompts file with one prompt per line")
    if n < 1:
        raise ValueError(f"n must be a positive number of images, got {n}")
    state = PartialState()
    out = Path(out)
    render_set(pipe, prompts, n, out / "reference", state, seed, **options)
    quantize(pipe)
    render_set(pipe, prompts, n, out / "quantized", state, seed, **options)
    if not state.is_main_process:
        return None
    result = evaluate_images(out / "reference", out / "quantized", features=features, device=device)
    result["metrics"].update(_clip_scores(clip, prompts, result["pairs"], out, device))
    write_report(result, out)
    return result


CLIP_BATCH = 16


def _clip_scores(model_id: str, prompts: list[str], pairs: list[dict], out: Path, device) -> dict:
    """{"clip_reference": ..., "clip_test": ...}: the mean CLIP score of each set, every image (or
    video frame) against the prompt it was generated from."""
    try:
        score = clip_scorer(model_id, device or "cpu")
    except MetricUnavailable as e:
        return {"clip_reference": {"skipped": str(e)}, "clip_test": {"skipped": str(e)}}
    scores = {}
    for key, folder, side in (("clip_reference", out / "reference", "ref"),
                              ("clip_test", out / "quantized", "test")):
        values = []
        for start in range(0, len(pairs), CLIP_BATCH):  # one set's images share their size
            paths = [pair[side] for pair in pairs[start:start + CLIP_BATCH]]
            # "<i>.png" or "<i>/<frame>.png": the image index leads the path
            indices = [int(Path(path).parts[0].split(".")[0]) for path in paths]
            images = torch.stack([load_image(folder / path) for path in paths])
            values += score(images, [prompts[i % len(prompts)] for i in indices]).tolist()
        scores[key] = {"value": sum(values) / len(values), "model": model_id}
    return scores
