"""Calibration by running a diffusers pipeline itself on prompts (timestep-aware calibration).

The full-precision pipeline generates from each prompt with its own scheduler and step count, so
the denoiser sees the inputs of the whole denoising trajectory, and, with classifier-free guidance,
of both branches (diffusers batches the conditional and unconditional inputs into one call).
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager
from typing import Callable

import torch
from tqdm.auto import tqdm


def is_pipeline(obj) -> bool:
    """Whether `obj` looks like a diffusers pipeline with a denoiser (duck-typed: no diffusers import)."""
    return hasattr(obj, "components") and any(
        isinstance(getattr(obj, attr, None), torch.nn.Module) for attr in ("transformer", "unet"))


def pipeline_forward_loop(pipe, prompts, *, num_inference_steps: int | None = None,
                          guidance_scale: float | None = None, batch_size: int = 1,
                          height: int | None = None, width: int | None = None,
                          num_frames: int | None = None, seed: int = 0,
                          max_prompts: int | None = None) -> Callable[..., None]:
    """A callable that generates from `prompts` with `pipe`, `batch_size` prompts per call.

    Options left at None keep the pipeline's own defaults (its step count, its guidance scale, so
    both guidance branches run when it guides; height/width in pixels; num_frames for video
    pipelines). Batch i is generated with a CPU `torch.Generator` seeded `seed + i`, so every run
    gives the denoiser bitwise the same inputs (vqz may run the loop twice). Latents are not
    decoded (`output_type="latent"` where the pipeline takes it). `max_prompts` keeps the first
    that many prompts.

    The callable takes no argument, or `pipe` itself, so it can be passed as
    `vqz.quantize(pipe, calib=pipeline_forward_loop(pipe, prompts, num_inference_steps=20))`.
    Raises ValueError (empty prompt list, an option the pipeline does not take) or TypeError (not a
    text-to-image/video pipeline, prompts that are not strings) at once, before anything runs.
    """
    if not is_pipeline(pipe):
        raise TypeError(f"pipeline_forward_loop needs a diffusers pipeline with a .transformer or "
                        f".unet, got {type(pipe).__name__}")
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings; for a prompts file use "
                        "read_prompts(path), for one prompt pass [prompt]")
    if max_prompts is not None and max_prompts < 1:
        raise ValueError(f"max_prompts must be >= 1 (or None for all), got {max_prompts}")
    prompts = list(prompts)[:max_prompts]
    if not prompts:
        raise ValueError("the calibration prompt list is empty; pass at least one prompt (or "
                         "calib='default' for vqz's bundled prompts)")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"calibration prompts must be strings, got {type(bad[0]).__name__}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    accepted = inspect.signature(pipe.__call__).parameters
    for required in ("prompt", "generator"):
        if required not in accepted:
            raise TypeError(f"{type(pipe).__name__} takes no `{required}` argument, so vqz cannot "
                            f"calibrate it from prompts; pass calib= a forward_loop(pipe) callable "
                            f"that runs it")
    kwargs = call_options(pipe, num_inference_steps=num_inference_steps,
                          guidance_scale=guidance_scale, height=height, width=width,
                          num_frames=num_frames)
    if "output_type" in accepted:
        kwargs["output_type"] = "latent"  # the denoiser is calibrated; decoding would be wasted
    batches = [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]

    def loop(pipeline=None) -> None:
        if pipeline is not None and pipeline is not pipe:
            raise ValueError("this calibration loop was built for another pipeline")
        with inner_progress_bars_off(pipe), tqdm(total=len(prompts), desc="vqz calibration",
                                                  unit="prompt", leave=False) as bar:
            for i, batch in enumerate(batches):
                pipe(prompt=batch, generator=torch.Generator().manual_seed(seed + i), **kwargs)
                bar.update(len(batch))
    return loop


def call_options(pipe, **options) -> dict:
    """The keyword arguments for `pipe(...)`: the options that are not None, checked against its
    signature (ValueError for one it does not take), num_frames under the pipeline's own name."""
    accepted = inspect.signature(pipe.__call__).parameters
    name = type(pipe).__name__
    kwargs = {k: v for k, v in options.items() if v is not None}
    if "num_frames" in kwargs and "num_frames" not in accepted and "frames" in accepted:
        kwargs["frames"] = kwargs.pop("num_frames")  # SanaVideoPipeline's name for it
    for key in kwargs:
        if key not in accepted:
            if key == "num_frames":
                raise ValueError(f"{name} takes no frame count (an image pipeline, or one that "
                                 f"follows an input video), but num_frames={kwargs[key]} "
                                 f"(--frames) was given")
            raise ValueError(f"{name} does not take {key}=; leave it out")
    return kwargs


@contextmanager
def inner_progress_bars_off(pipe):
    """Silences the pipeline's own per-call step bar (one bar per prompt batch would flood the
    output) while the loop's bar runs, then puts the pipeline's setting back."""
    if not hasattr(pipe, "set_progress_bar_config"):
        yield
        return
    saved = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(**{**saved, "disable": True})
    try:
        yield
    finally:
        pipe.set_progress_bar_config(**saved)
