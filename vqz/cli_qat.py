"""`vqz qat`: quantization-aware training of a diffusers pipeline's denoiser on its own trajectories."""
from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from .config import qat_presets
from .qat.trainer import LR_SCHEDULES


def _qat(args) -> int:
    import torch

    import vqz
    from .calib.pipeline import pipeline_forward_loop
    from .calib.prompts import default_prompts, read_prompts
    from .cli import DTYPES
    from .config import get_qat_preset
    from .pipelines.loading import SOURCE_NAME, load_pipeline

    recipe = get_qat_preset(args.preset)  # fails on a bad name before the model loads
    recipe = replace(recipe, **{name: value for name in ("smooth", "rotate")
                                if (value := getattr(args, name)) is not None})
    pipe, source = load_pipeline(args.model, getattr(torch, DTYPES[args.dtype]))
    pipe.to(args.device)
    prompts = read_prompts(args.prompts) if args.prompts else default_prompts()
    data = pipeline_forward_loop(pipe, prompts, num_inference_steps=args.inference_steps,
                                 max_prompts=args.prompt_count)
    out = Path(args.out)
    log = vqz.train_qat(pipe, recipe, data=data, steps=args.steps, lr=args.lr,
                        quant_lr=args.quant_lr,
                        lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps,
                        decay_every=args.decay_every, accumulate=args.accumulate,
                        records_per_step=args.records_per_step, refresh_every=args.refresh_every,
                        guidance_loss=args.guidance_loss,
                        gradient_checkpointing=args.gradient_checkpointing,
                        spike_threshold=args.spike_threshold, out=out / "training",
                        checkpoint_every=args.checkpoint_every, resume=args.resume)
    file = vqz.save(pipe, out)
    (out / SOURCE_NAME).write_text(json.dumps({**source, "preset": args.preset,
                                               "smooth": recipe.smooth, "rotate": recipe.rotate},
                                              indent=2))
    print(vqz.summary(pipe))
    print(f"\n{len(log.losses)} steps, final loss {log.losses[-1]:.4g}, "
          f"{log.samples_per_second:.1f} samples/s; wrote {file} and {out / SOURCE_NAME}")
    return 0


def add_qat_parser(sub) -> None:
    from .cli import DTYPES, _cuda

    p = sub.add_parser("qat", help="quantization-aware training of a diffusers pipeline's denoiser "
                       "(distilled from itself on its own trajectories), then save it")
    p.add_argument("--model", required=True, help="diffusers hub id or pipeline folder")
    p.add_argument("--preset", required=True, help=f"one of: {', '.join(qat_presets())}")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps")
    p.add_argument("--out", required=True, help="output folder (quantized model; checkpoints "
                   "and the loss log under training/)")
    p.add_argument("--prompts", help="prompts file (.txt, or .tsv with a Prompt column; default: "
                   "vqz's own prompts)")
    p.add_argument("--prompt-count", type=int, default=32, help="prompts to generate from (default 32)")
    p.add_argument("--inference-steps", type=int, help="denoising steps per prompt (default: the "
                   "pipeline's)")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (default 1e-4)")
    p.add_argument("--quant-lr", type=float, help="learning rate of the learned scales and clip "
                   "ratios (default: --lr)")
    p.add_argument("--smooth", action=argparse.BooleanOptionalAction, help="SVDQuant smoothing, "
                   "kept at inference (default: the preset's, on for w4a4-svd-qat only)")
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, help="block-Hadamard rotation "
                   "of the inputs of layers with a channel count divisible by 64 (default: the "
                   "preset's, on for w4a4-qat)")
    p.add_argument("--decay-every", type=int, help="steps per rank halving (default: the decay "
                   "spread over the first 75%% of the steps; w4a4-svd-qat keeps its branch and "
                   "has no decay)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant",
                   help="constant, or cosine decay to 0 at the last step (default constant)")
    p.add_argument("--warmup-steps", type=int, default=0, help="steps of linear learning-rate warm-up")
    p.add_argument("--accumulate", type=int, default=1, help="forwards per optimizer step")
    p.add_argument("--records-per-step", type=int, default=1, help="recorded denoiser calls "
                   "batched into each forward (several timesteps at once; default 1)")
    p.add_argument("--refresh-every", type=int, default=0, help="steps between re-generations of "
                   "the training trajectories by the model in training (labelled by a "
                   "full-precision copy; default 0: never)")
    p.add_argument("--guidance-loss", type=float, default=0.0, help="weight of the squared "
                   "difference between the errors of the two classifier-free-guidance branches "
                   "(default 0: off)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--spike-threshold", type=float, help="SPAM spike-aware clipping threshold "
                   "(e.g. 5000; default off)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints")
    p.add_argument("--resume", help="a training/checkpoint-<step> folder to continue from")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                   help="weights' dtype while training (default fp32; bf16 autocast on GPUs)")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.set_defaults(func=_qat)
