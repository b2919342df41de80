"""One generation from a diffusers pipeline: the images (or video frames) as PIL images."""
from __future__ import annotations

import torch

from vqz.calib.pipeline import call_options


def generate(pipe, prompt: str, seed: int, *, steps: int | None = None, guidance: float | None = None,
             height: int | None = None, width: int | None = None,
             frames: int | None = None) -> tuple[list, bool]:
    """([image], False) for an image pipeline, (frames, True) for a video pipeline. Options left
    at None keep the pipeline's defaults; the noise comes from a CPU generator seeded `seed`."""
    options = call_options(pipe, num_inference_steps=steps, guidance_scale=guidance, height=height,
                           width=width, num_frames=frames)
    output = pipe(prompt=prompt, generator=torch.Generator().manual_seed(seed), **options)
    if hasattr(output, "frames"):
        return [f if hasattr(f, "save") else _to_pil(f) for f in output.frames[0]], True
    return [output.images[0]], False


def _to_pil(frame):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.asarray(frame) * 255).round().clip(0, 255).astype("uint8"))
