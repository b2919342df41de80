"""The `vqz` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PRESET_DESCRIPTIONS, presets

NOT_YET = {
    "eval": "evaluation (ImageNet accuracy, depth metrics, image metrics)",
    "bench": "kernel benchmarks",
}


DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _quantize(args) -> int:
    import vqz
    from .config import get_preset
    from .pipelines.loading import SOURCE_NAME, is_diffusers_source

    get_preset(args.preset)  # fail on a bad name before loading the model
    if is_diffusers_source(args.model):
        model, source = _quantized_pipeline(args)
    else:
        model, source = _quantized_timm(args)
    out = Path(args.out)
    file = vqz.save(model, out)
    (out / SOURCE_NAME).write_text(json.dumps({**source, "preset": args.preset}, indent=2))
    table = str(vqz.summary(model))
    (out / "summary.txt").write_text(table + "\n")
    print(table)
    print(f"\nwrote {file} and {out / SOURCE_NAME}")
    return 0


def _quantized_timm(args):
    import vqz
    from .calib.images import image_batches
    from .pipelines.loading import load_model

    model, source = load_model(args.model, args.checkpoint)
    calib = image_batches(args.calib, model, args.calib_count) if args.calib else None
    return vqz.quantize(model, args.preset, calib=calib), source


def _quantized_pipeline(args):
    """Load the pipeline, calibrate on prompts (the given file or vqz's own list) when the preset
    needs data, quantize its denoiser."""
    import torch

    import vqz
    from .calib.pipeline import pipeline_forward_loop
    from .calib.prompts import default_prompts, read_prompts
    from .config import get_preset
    from .pipelines.loading import load_pipeline

    if getattr(args, "checkpoint", None):
        raise ValueError("--checkpoint is for timm models; a pipeline folder holds its weights")
    pipe, source = load_pipeline(args.model, getattr(torch, DTYPES[args.dtype]))
    pipe.to(args.device)
    calib = None
    if get_preset(args.preset).needs_calibration or args.calib:
        prompts = read_prompts(args.calib) if args.calib else default_prompts()
        calib = pipeline_forward_loop(pipe, prompts, num_inference_steps=args.steps,
                                      max_prompts=args.calib_count)
    vqz.quantize(pipe, args.preset, calib=calib)
    return pipe, source


def _generate(args) -> int:
    import torch

    import vqz
    from .pipelines.loading import (denoiser_skeleton, load_pipeline, pipeline_with, read_source)

    dtype = getattr(torch, DTYPES[args.dtype])
    if (args.preset is None) == (args.quantized is None):
        raise ValueError("give exactly one of --preset (quantize now) or --quantized DIR (a "
                         "folder written by `vqz quantize`)")
    if args.quantized:
        source = read_source(args.quantized)
        model = args.model or source["id"]
        denoiser = vqz.load(denoiser_skeleton(model, source["component"]), args.quantized)
        pipe = pipeline_with(model, source["component"], denoiser, dtype)
    else:
        if args.model is None:
            raise ValueError("--model is required with --preset")
        pipe, _ = _quantized_pipeline(args)
    pipe.to(args.device)
    result = _run_pipeline(pipe, args)
    print(f"wrote {result}")
    return 0


def _run_pipeline(pipe, args) -> Path:
    """One generation; a PNG for images, an animated GIF for videos (frames)."""
    import inspect

    import torch

    options = {"num_inference_steps": args.steps, "guidance_scale": args.guidance,
               "height": args.height, "width": args.width, "num_frames": args.frames}
    accepted = inspect.signature(type(pipe).__call__).parameters
    if args.frames is not None and "num_frames" not in accepted:
        raise ValueError(f"--frames is a video option; {type(pipe).__name__} makes images")
    options = {k: v for k, v in options.items() if v is not None and k in accepted}
    output = pipe(prompt=args.prompt, generator=torch.Generator().manual_seed(args.seed), **options)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if hasattr(output, "frames"):
        frames = output.frames[0]
        frames = [f if hasattr(f, "save") else _to_pil(f) for f in frames]
        frames[0].save(out.with_suffix(".gif"), save_all=True, append_images=frames[1:], duration=125,
                       loop=0)
        return out.with_suffix(".gif")
    output.images[0].save(out)
    return out


def _to_pil(frame):
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.asarray(frame) * 255).round().clip(0, 255).astype("uint8"))


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(Path(args.out))
    return 0


def _presets(args) -> int:
    for name in presets():
        print(f"{name:12s} {PRESET_DESCRIPTIONS[name]}")
    return 0


def _not_yet(args) -> int:
    print(f"vqz {args.command}: {NOT_YET[args.command]} is not available in vqz "
          f"{_version()} yet.", file=sys.stderr)
    return 2


def _version() -> str:
    from . import __version__
    return __version__


def _pipeline_options(p, calib_help: str) -> None:
    p.add_argument("--calib", help=calib_help)
    p.add_argument("--calib-count", type=int, default=32, help="calibration prompts or images "
                   "(default 32)")
    p.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="pipeline dtype")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vqz", description="Quantize diffusion pipelines and "
                                     "vision models to 8 and 4 bits.")
    parser.add_argument("--version", action="version", version=f"vqz {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="quantize the bundled reference model (offline); writes a PNG "
                       "grid and metrics")
    p.add_argument("--out", default="vqz-demo", help="output folder (default ./vqz-demo)")
    p.set_defaults(func=_demo)

    p = sub.add_parser("quantize", help="quantize a model and save it")
    p.add_argument("--model", required=True, help="diffusers hub id or pipeline folder; timm model "
                   "name or timm model folder")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(presets())}")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", help="timm: local weights (.safetensors/.pt) to load")
    _pipeline_options(p, calib_help="pipelines: prompts file (.txt, or .tsv with a Prompt column; "
                      "default: vqz's own prompts); timm: folder of calibration images")
    p.set_defaults(func=_quantize)

    p = sub.add_parser("generate", help="generate with a quantized diffusers pipeline")
    p.add_argument("--model", help="diffusers hub id or pipeline folder (default: the one a "
                   "--quantized folder names)")
    p.add_argument("--preset", help="quantize now with this preset")
    p.add_argument("--quantized", help="a folder written by `vqz quantize`")
    p.add_argument("--prompt", required=True)
    p.add_argument("--out", required=True, help="output image (.png) or video (.gif)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="video pipelines: number of frames")
    _pipeline_options(p, calib_help="with --preset: calibration prompts file")
    p.set_defaults(func=_generate)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=_presets)

    for name, what in NOT_YET.items():
        p = sub.add_parser(name, help=f"{what} (not available yet)")
        p.set_defaults(func=_not_yet)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.func is not _not_yet:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"vqz {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
