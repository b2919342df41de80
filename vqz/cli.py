"""The `vqz` command."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import PRESET_DESCRIPTIONS, presets

NOT_YET = {
    "generate": "image and video generation with diffusers pipelines",
    "eval": "evaluation (ImageNet accuracy, depth metrics, image metrics)",
    "bench": "kernel benchmarks",
}


def _quantize(args) -> int:
    import vqz
    from .calib.images import image_batches
    from .config import get_preset
    from .pipelines.loading import SOURCE_NAME, load_model

    get_preset(args.preset)  # fail on a bad name before loading the model
    model, source = load_model(args.model, args.checkpoint)
    calib = image_batches(args.calib, model, args.calib_count) if args.calib else None
    vqz.quantize(model, args.preset, calib=calib)
    out = Path(args.out)
    file = vqz.save(model, out)
    (out / SOURCE_NAME).write_text(json.dumps({**source, "preset": args.preset}, indent=2))
    table = str(vqz.summary(model))
    (out / "summary.txt").write_text(table + "\n")
    print(table)
    print(f"\nwrote {file} and {out / SOURCE_NAME}")
    return 0


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
    p.add_argument("--model", required=True, help="timm model name or a local timm model folder")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(presets())}")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--checkpoint", help="local weights (.safetensors/.pt) to load into the model")
    p.add_argument("--calib", help="folder of calibration images (needed by static presets)")
    p.add_argument("--calib-count", type=int, default=32, help="calibration images (default 32)")
    p.set_defaults(func=_quantize)

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
