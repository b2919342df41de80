"""The `vqz` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cli_qat import add_qat_parser
from .config import FAMILY_DESCRIPTIONS, FAMILY_PRESETS, PRESET_DESCRIPTIONS, presets, qat_presets

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _quantize(args) -> int:
    import vqz
    from .config import check_preset_name
    from .pipelines.loading import SOURCE_NAME, is_diffusers_source

    check_preset_name(args.preset)  # fail on a bad name before loading the model
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

    from .pipelines.loading import load_pipeline

    if getattr(args, "checkpoint", None):
        raise ValueError("--checkpoint is for timm models; a pipeline folder holds its weights")
    pipe, source = load_pipeline(args.model, getattr(torch, DTYPES[args.dtype]))
    pipe.to(args.device)
    _quantize_pipe(pipe, args)
    return pipe, source


def _quantize_pipe(pipe, args) -> None:
    """Quantize a loaded pipeline's denoiser with --preset, calibrating on prompts (the --calib
    file or vqz's own list) when the preset needs data."""
    import vqz
    from .calib.pipeline import pipeline_forward_loop
    from .calib.prompts import default_prompts, read_prompts
    from .config import get_preset

    calib = None
    if get_preset(args.preset).needs_calibration or args.calib:
        prompts = read_prompts(args.calib) if args.calib else default_prompts()
        calib = pipeline_forward_loop(pipe, prompts, num_inference_steps=args.steps,
                                      max_prompts=args.calib_count)
    vqz.quantize(pipe, args.preset, calib=calib)


def _generate(args) -> int:
    import torch

    import vqz
    from .pipelines.loading import (denoiser_skeleton, pipeline_with, read_source)

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
    from .eval.generation import generate

    images, video = generate(pipe, args.prompt, args.seed, steps=args.steps, guidance=args.guidance,
                             height=args.height, width=args.width, frames=args.frames)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if video:
        images[0].save(out.with_suffix(".gif"), save_all=True, append_images=images[1:],
                       duration=125, loop=0)
        return out.with_suffix(".gif")
    images[0].save(out)
    return out


def _demo(args) -> int:
    from .demo import run_demo
    run_demo(Path(args.out))
    return 0


def _presets(args) -> int:
    for name in presets():
        print(f"{name:12s} {PRESET_DESCRIPTIONS[name]}")
    print("\nquantization-aware training (vqz qat / vqz.train_qat):")
    for name in qat_presets():
        print(f"{name:12s} {PRESET_DESCRIPTIONS[name]}")
    for family, names in FAMILY_PRESETS.items():
        aliases = ", ".join(f"{generic} -> {recipe}" for generic, recipe in names.items())
        print(f"\non {FAMILY_DESCRIPTIONS[family]}: {aliases}")
    return 0


def _eval_imagenet(args) -> int:
    from .eval.classification import (format_results, imagenet_eval, result_rows,
                                      write_results_csv)

    result = imagenet_eval(args.model, args.data, args.preset, checkpoint=args.checkpoint,
                           calib_data=args.calib_data, calib_count=args.calib_count,
                           batch_size=args.batch_size, limit=args.limit, device=args.device,
                           workers=args.workers)
    print(format_results(result))
    if args.csv:
        print(f"\nwrote {write_results_csv(args.csv, result_rows(result))}")
    return 0


def _eval_depth(args) -> int:
    from .eval.depth import depth_eval, format_table

    result = depth_eval(args.model, args.data, args.preset, dataset=args.dataset,
                        align=args.align, calib_count=args.calib_count)
    print(f"{result['model']}: {result['images']} images, {result['dataset']}, align "
          f"{result['align']}, metrics averaged per image")
    print(format_table({"fp": result["full_precision"], args.preset: result["quantized"]}))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nwrote {args.json}")
    return 0


def _depth_parser(group) -> None:
    from .eval.depth import ALIGNMENTS, DATASETS

    p = group.add_parser("depth", help="AbsRel/RMSE/δ1 of a transformers depth model, full "
                         "precision vs quantized")
    p.add_argument("--model", required=True, help="hub id or save_pretrained folder of a "
                   "transformers depth model (Depth Anything, DPT, ...)")
    p.add_argument("--data", required=True, help="folder of <name>.png|.jpg with <name>_depth.png "
                   "(16-bit, mm) or <name>_depth.npy (m)")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(presets())}")
    p.add_argument("--dataset", choices=sorted(DATASETS), default="nyu", help="depth range and "
                   "crop: nyu (1e-3..10 m, Eigen crop) or kitti (1e-3..80 m, Garg crop)")
    p.add_argument("--align", choices=ALIGNMENTS, help="fit relative predictions to the ground "
                   "truth per image (default: lstsq-disparity, or none for metric Depth Anything)")
    p.add_argument("--calib-count", type=int, default=8, help="calibration images, the first of "
                   "--data (default 8)")
    p.add_argument("--json", help="write the results here")
    p.set_defaults(func=_eval_depth)


def _eval_images(args) -> int:
    from .eval.image_sets import evaluate_images
    from .eval.report import format_table, write_report

    result = evaluate_images(args.ref, args.test, features=args.features,
                             batch_size=args.batch_size, device=args.device,
                             kid_subset_size=args.kid_subset_size)
    print(format_table(result))
    json_path, html_path = write_report(result, args.out)
    print(f"\nwrote {json_path} and {html_path}")
    return 0


def _eval_pipeline(args) -> int:
    import torch
    from accelerate import PartialState

    from .calib.prompts import read_prompts
    from .config import check_preset_name
    from .eval.pipeline_eval import evaluate_pipeline
    from .eval.report import format_table
    from .pipelines.loading import load_pipeline

    check_preset_name(args.preset)
    prompts = read_prompts(args.prompts)  # an empty file fails here, before the model loads
    state = PartialState()
    device = state.device if args.device == "cuda" else args.device  # one GPU per process
    pipe, _ = load_pipeline(args.model, getattr(torch, DTYPES[args.dtype]))
    pipe.to(device)
    result = evaluate_pipeline(pipe, lambda p: _quantize_pipe(p, args), prompts, args.n, args.out,
                               features=args.features, clip=args.clip, seed=args.seed,
                               device=device,
                               steps=args.steps, guidance=args.guidance, height=args.height,
                               width=args.width, frames=args.frames)
    if result is not None:
        print(format_table(result))
        print(f"\nwrote {args.out}/metrics.json and {args.out}/report.html")
    return 0


def _pipeline_eval_parser(group) -> None:
    from .eval.clip_score import DEFAULT_CLIP
    from .eval.features import SPECS

    p = group.add_parser("pipeline", help="generate full-precision and quantized images from the "
                         "same prompts and seeds, compare them and write an HTML report (shards "
                         "over GPUs under accelerate launch)")
    p.add_argument("--model", required=True, help="diffusers hub id or pipeline folder")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(presets())}")
    p.add_argument("--prompts", required=True, help="prompts file (.txt, or .tsv with a Prompt column)")
    p.add_argument("--n", type=int, default=64, help="images per set; image i uses prompt i mod "
                   "the prompt count and seed --seed + i (default 64)")
    p.add_argument("--out", default="vqz-eval-pipeline", help="folder for both image sets, "
                   "metrics.json and report.html")
    p.add_argument("--features", default="inception", help=f"FID/KID feature network: {SPECS}")
    p.add_argument("--clip", default=DEFAULT_CLIP, help="CLIP model id or folder for the CLIP "
                   f"score (default {DEFAULT_CLIP})")
    _generation_options(p)
    _pipeline_options(p, calib_help="calibration prompts file (default: vqz's own prompts)")
    p.set_defaults(func=_eval_pipeline)


def _images_parser(group) -> None:
    from .eval.features import SPECS

    p = group.add_parser("images", help="PSNR, SSIM, LPIPS (paired) and FID, KID (sets) of test "
                         "images against reference images; metrics whose nets are missing are "
                         "skipped with the reason")
    p.add_argument("--ref", required=True, help="reference images (png, jpg, jpeg, webp; "
                   "sub-folders too), e.g. full-precision samples or video frames")
    p.add_argument("--test", required=True, help="test images, paired with --ref by sorted file "
                   "name; same count and sizes")
    p.add_argument("--out", default="vqz-eval-images", help="folder for metrics.json and "
                   "report.html (default ./vqz-eval-images)")
    p.add_argument("--features", default="inception", help=f"FID/KID feature network: {SPECS} "
                   "(default inception)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--kid-subset-size", type=int, default=1000, help="KID subset size, capped at "
                   "the image count (default 1000)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(func=_eval_images)


def _eval_parser(sub) -> None:
    group = sub.add_parser("eval", help="measure what quantization lost").add_subparsers(
        dest="eval_command", required=True)
    p = group.add_parser("imagenet", help="top-1/top-5 of a timm model, full precision vs quantized")
    p.add_argument("--model", required=True, help="timm model name or timm model folder")
    p.add_argument("--checkpoint", help="local weights (.safetensors/.pt) to load")
    p.add_argument("--data", required=True, help="ImageFolder: <data>/<class>/<image>, sorted "
                   "class folder names = class indices")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(presets())}")
    p.add_argument("--calib-data", help="calibration image folder (default: the first "
                   "--calib-count images of --data)")
    p.add_argument("--calib-count", type=int, default=32, help="calibration images (default 32)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, help="evaluate N images, evenly spaced over "
                   "the sorted list")
    p.add_argument("--workers", type=int, default=2, help="data loader workers (default 2)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--csv", help="write timm-style results (full precision and quantized rows)")
    p.set_defaults(func=_eval_imagenet)
    _depth_parser(group)
    _images_parser(group)
    _pipeline_eval_parser(group)


def _bench_kernels(args) -> int:
    from .kernels.bench import run

    run(args.json, quick=args.quick)
    return 0


def _version() -> str:
    from . import __version__
    return __version__


def _generation_options(p) -> None:
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--frames", type=int, help="video pipelines: number of frames")


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
    _generation_options(p)
    _pipeline_options(p, calib_help="with --preset: calibration prompts file")
    p.set_defaults(func=_generate)

    p = sub.add_parser("presets", help="list the presets")
    p.set_defaults(func=_presets)

    add_qat_parser(sub)
    _eval_parser(sub)

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="bench_command",
                                                                     required=True)
    p = bench.add_parser("kernels", help="quantized linear kernels vs cuBLAS BF16 on the layer "
                         "shapes of FLUX, SDXL, PixArt, Wan and ViT-B (needs CUDA)")
    p.add_argument("--json", help="write the results to this file")
    p.add_argument("--quick", action="store_true", help="two shapes only, no transformer block")
    p.set_defaults(func=_bench_kernels)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as e:
        print(f"vqz {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
