"""What the reference-model training scripts share: their command line and learning-rate schedule."""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path


def training_parser(description: str, batch_size: int) -> argparse.ArgumentParser:
    """--out, --data, --minutes, --steps, --batch-size, --compile, --seed; scripts add their own."""
    default_data = Path(os.environ.get("VQZ_DATA", "../shared/data")) / "cifar10" / "cifar10_test.npz"
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--out", type=Path, default=Path("samples/reference"))
    p.add_argument("--data", type=Path, default=default_data, help="CIFAR-10 npz (x uint8 [N,32,32,3], y)")
    p.add_argument("--minutes", type=float, default=4.0, help="training time budget per model")
    p.add_argument("--steps", type=int, default=None, help="stop after this many steps (smoke tests)")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--compile", action="store_true", help="torch.compile the training model")
    p.add_argument("--seed", type=int, default=0)
    return p


def parse_budget(p: argparse.ArgumentParser) -> argparse.Namespace:
    args = p.parse_args()
    if args.minutes <= 0 or (args.steps is not None and args.steps <= 0):
        p.error("--minutes and --steps must be positive")
    return args


def warmup_cosine(base: float, step: int, progress: float, warmup: int) -> float:
    """Linear warmup over `warmup` steps, then cosine decay over the run's progress in [0, 1]."""
    return base * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * progress))


def training_device(args: argparse.Namespace):
    """CUDA when there is one; on the CPU only smoke tests (--steps) run. Exits on missing data."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.steps is None:
        sys.exit("no CUDA device: on the CPU this script only runs smoke tests; pass --steps N")
    if not args.data.is_file():
        sys.exit(f"no data at {args.data}: pass --data PATH to cifar10_test.npz or set VQZ_DATA")
    return device


def budgeted_steps(args: argparse.Namespace):
    """(step, progress in [0, 1], seconds elapsed) for each training step, until the --minutes
    budget or the --steps count runs out."""
    budget, start, step = args.minutes * 60, time.perf_counter(), 0
    while True:
        elapsed = time.perf_counter() - start
        if elapsed >= budget or (args.steps is not None and step >= args.steps):
            return
        yield step, max(elapsed / budget, step / args.steps if args.steps else 0.0), elapsed
        step += 1
