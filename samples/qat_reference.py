"""QAT `w4a4-qat` (or `--preset w4a4-svd-qat`: SVDQuant's layers with their 16-bit branch, trained
and kept) of the reference DiT against PTQ `w4a4-svd`: PSNR/SSIM of samples drawn with the same
seeds as the full-precision model (DDIM, 25 steps, guidance 3).

Training data are the full-precision model's own sampling trajectories (both guidance branches) on
seeds disjoint from the evaluation and calibration seeds; the targets are its outputs there.

    python samples/qat_reference.py --calls 32 --lr 1e-4 --quant-lr 1e-5 --lr-schedule cosine \\
        --records-per-step 8 --steps 750 --json qat.json   # the README's best row, 8 min on an H200
    # the same loss curve on two GPUs (DDP) and on one with the same effective batch:
    accelerate launch --num_processes 2 samples/qat_reference.py --steps 800 --curve-only --out runs/ddp2
    python samples/qat_reference.py --steps 800 --accumulate 2 --curve-only --out runs/single
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from dataclasses import replace

import torch

import vqz
from vqz.config import LayerRule, get_preset, get_qat_preset, qat_presets
from vqz.eval.images import psnr, ssim
from vqz.pipelines.reference import load_reference, sample
from vqz.qat.trainer import LR_SCHEDULES

EVAL_SEED, CALIB_SEED, TRAIN_SEED, HELD_OUT_SEED = 0, 1000, 2000, 3000


def trajectories(calls: int, batch: int, steps: int):
    """data= for vqz.train_qat: `calls` sampler runs of `batch` images each, new seeds."""
    def loop(model):
        for i in range(calls):
            sample(model, n=batch, seed=TRAIN_SEED + i, steps=steps)
    return loop


def timestep_sensitivity(model, n: int, steps: int, scale: float = 1e-2) -> dict[int, float]:
    """How much the final images move per unit of error in the denoiser's output at each sampling
    step: mean squared image change / scale² when the output of that step's call alone gets
    Gaussian noise of std `scale` (both guidance branches), on seeds of the training data."""
    from vqz.calib.timestep import timestep_of

    base = sample(model, n=n, seed=TRAIN_SEED, steps=steps)
    noise = torch.Generator().manual_seed(EVAL_SEED)
    sensitivity = {}
    for k in range(steps):
        calls = []

        def perturb(module, args, kwargs, output):
            calls.append(timestep_of(module, args, kwargs))
            if len(calls) - 1 == k:
                out = output[0]
                out = out + scale * torch.randn(out.shape, generator=noise).to(out.device, out.dtype)
                return (out, *output[1:])

        handle = model.register_forward_hook(perturb, with_kwargs=True)
        try:
            images = sample(model, n=n, seed=TRAIN_SEED, steps=steps)
        finally:
            handle.remove()
        sensitivity[round(calls[k])] = (images - base).pow(2).mean().item() / scale**2
    return sensitivity


def sensitivity_weight(sensitivity: dict[int, float], power: float):
    """timestep -> loss weight: the sensitivity of the nearest sampled timestep to the `power`,
    over the mean of those."""
    scaled = {t: s**power for t, s in sensitivity.items()}
    mean = sum(scaled.values()) / len(scaled)

    def weight(t):
        return scaled[min(scaled, key=lambda s: abs(s - t))] / mean
    return weight


def held_out_calls(fp, steps: int, n: int = 16):
    """The full-precision model's calls (inputs and outputs) along its own trajectories on seeds
    used neither for training nor for evaluation."""
    from vqz.qat.data import record_calls

    return record_calls(fp, lambda: sample(fp, n=n, seed=HELD_OUT_SEED, steps=steps))


@torch.no_grad()
def call_error(model, records, guidance: float = 3.0) -> dict:
    """Mean squared error of `model`'s prediction against the full-precision one at the same
    inputs, over all records and over the high-noise (t >= 500) and low-noise halves: the
    per-call error the training minimises, without the drift of the model's own trajectories.
    `guided/...`: the same for the classifier-free-guided prediction the sampler steps with,
    uncond + guidance (cond - uncond), whose error is guidance * e_cond + (1 - guidance) * e_uncond."""
    from vqz.calib.sources import device_of

    device = device_of(model)
    errors = {}
    for r in records:
        error = r.predict(model, device).float().cpu() - r.target.float()
        e_cond, e_uncond = error.chunk(2)
        half = "t>=500" if r.timestep >= 500 else "t<500"
        for key, e in (("", error), ("guided/", guidance * e_cond + (1 - guidance) * e_uncond)):
            for name in ("all", half):
                errors.setdefault(key + name, []).append(e.pow(2).mean().item())
    return {k: sum(v) / len(v) for k, v in errors.items()}


def with_8bit_inputs(config, pattern: str, eight_bit):
    """`config` with the inputs of the layers matching `pattern` quantized as `eight_bit`'s
    activations (a mixed recipe)."""
    return replace(config, rules=config.rules + (LayerRule(pattern, act=eight_bit.act),))


def quality(model, reference, n, steps) -> dict:
    images = sample(model, n=n, seed=EVAL_SEED, steps=steps)
    return {"psnr_db": psnr(images, reference).mean().item(), "ssim": ssim(images, reference).mean().item()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=qat_presets(), default="w4a4-qat", help="the QAT recipe "
                   "(default w4a4-qat)")
    p.add_argument("--steps", type=int, default=4000, help="QAT optimizer steps")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--quant-lr", type=float, help="learning rate of the learned scales and clip "
                   "ratios (default: --lr)")
    p.add_argument("--spike-threshold", type=float, help="SPAM's spike-aware gradient clipping "
                   "threshold (off by default)")
    p.add_argument("--accumulate", type=int, default=1)
    p.add_argument("--records-per-step", type=int, default=1, help="recorded calls batched into "
                   "each forward (mixed timesteps)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default="constant")
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--guidance-loss", type=float, default=0.0, help="weight of the squared "
                   "difference between the errors of the conditional and unconditional halves")
    p.add_argument("--refresh-every", type=int, default=0, help="steps between re-recordings of "
                   "the training trajectories by the student (teacher-labelled)")
    p.add_argument("--calls", type=int, default=16, help="sampler runs recorded as training data")
    p.add_argument("--batch", type=int, default=32, help="images per sampler run (2x per call: CFG)")
    p.add_argument("--n", type=int, default=32, help="evaluation images")
    p.add_argument("--sample-steps", type=int, default=25)
    p.add_argument("--smooth", action="store_true", help="add SVDQuant smoothing (w4a4-svd-qat "
                   "has it)")
    p.add_argument("--no-rotate", action="store_true", help="drop the preset's block-Hadamard "
                   "rotation (w4a4-qat's)")
    p.add_argument("--a8-layers", metavar="GLOB", help="layers whose inputs stay 8-bit (w4a8-qat's "
                   "activations), e.g. '*.ff.net.0.proj': a mixed recipe, not W4A4 everywhere")
    p.add_argument("--sensitivity-power", type=float, metavar="P", help="weight each training "
                   "call's loss by (how much an error at its timestep moves the final images)^P "
                   "(timestep_sensitivity), instead of uniformly")
    p.add_argument("--rank", type=int, help="the auxiliary branch's starting rank, or with "
                   "w4a4-svd-qat the kept branch's rank (default: the preset's 32; 0: plain QAT from "
                   "the rank-0 quantization); the PTQ baseline keeps w4a4-svd's 32")
    p.add_argument("--decay-fraction", type=float, help="share of the steps over which the "
                   "auxiliary branch's rank decays to 0, the rest training at rank 0 (default 0.75; "
                   "not for w4a4-svd-qat, which keeps its branch)")
    p.add_argument("--curve-only", action="store_true", help="train and write the loss log only")
    p.add_argument("--out", help="checkpoints and the loss log")
    p.add_argument("--json")
    args = p.parse_args()
    recipe = get_qat_preset(args.preset)
    if args.smooth and recipe.smooth:
        p.error(f"--smooth: {args.preset} smooths already")
    if args.no_rotate and not recipe.rotate:
        p.error(f"--no-rotate: {args.preset} does not rotate")
    if recipe.keep_branch and args.decay_fraction is not None:
        p.error(f"--decay-fraction: {args.preset} keeps its branch, which does not decay")
    recipe = replace(recipe, smooth=recipe.smooth or args.smooth,
                     rotate=recipe.rotate and not args.no_rotate)
    if args.rank is not None:
        recipe = replace(recipe, rank=args.rank)
    if args.a8_layers:
        recipe = with_8bit_inputs(recipe, args.a8_layers, get_qat_preset("w4a8-qat"))

    from accelerate import PartialState

    state = PartialState()
    fp = load_reference("dit").to(state.device)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
               "processes": state.num_processes, "preset": args.preset, "steps": args.steps,
               "lr": args.lr, "smooth": recipe.smooth, "rotate": recipe.rotate, "a8_layers": args.a8_layers,
               "sensitivity_power": args.sensitivity_power, "decay_fraction": args.decay_fraction, "rank": args.rank,
               "quant_lr": args.quant_lr, "spike_threshold": args.spike_threshold,
               "accumulate": args.accumulate, "records_per_step": args.records_per_step,
               "lr_schedule": args.lr_schedule, "warmup_steps": args.warmup_steps, "calls": args.calls,
               "refresh_every": args.refresh_every, "guidance_loss": args.guidance_loss}
    reference = held_out = None
    if not args.curve_only and state.is_main_process:
        reference = sample(fp, n=args.n, seed=EVAL_SEED, steps=args.sample_steps)
        held_out = held_out_calls(fp, args.sample_steps)
        svd = get_preset("w4a4-svd")
        baselines = {"ptq_w4a4_svd": svd}
        if args.a8_layers:  # the like-for-like PTQ baseline of a mixed recipe
            baselines["ptq_w4a4_svd_mixed"] = with_8bit_inputs(svd, args.a8_layers,
                                                               get_preset("w4a8"))
        for key, config in baselines.items():
            start = time.perf_counter()
            ptq = vqz.quantize(copy.deepcopy(fp), config, calib=lambda m: sample(
                m, n=16, seed=CALIB_SEED, steps=args.sample_steps))
            results[key] = {**quality(ptq, reference, args.n, args.sample_steps),
                            "seconds": time.perf_counter() - start,
                            "call_mse": call_error(ptq, held_out)}
            print(f"PTQ {key}: {results[key]}", flush=True)
    student = copy.deepcopy(fp)
    start = time.perf_counter()
    weight = None
    if args.sensitivity_power is not None:
        sensitivity = timestep_sensitivity(fp, n=16, steps=args.sample_steps)
        results["sensitivity"] = sensitivity
        weight = sensitivity_weight(sensitivity, args.sensitivity_power)
    log = vqz.train_qat(student, recipe, data=trajectories(args.calls, args.batch, args.sample_steps),
                        steps=args.steps, lr=args.lr, accumulate=args.accumulate, out=args.out,
                        records_per_step=args.records_per_step, lr_schedule=args.lr_schedule,
                        warmup_steps=args.warmup_steps, refresh_every=args.refresh_every,
                        guidance_loss=args.guidance_loss,
                        timestep_weight=weight, decay_fraction=args.decay_fraction,
                        quant_lr=args.quant_lr, spike_threshold=args.spike_threshold)
    results["qat_seconds"] = time.perf_counter() - start
    results["train_seconds"] = log.seconds
    results["samples_per_second"] = log.samples_per_second
    results["loss_first_100"] = sum(log.losses[:100]) / len(log.losses[:100])
    results["loss_last_100"] = sum(log.losses[-100:]) / len(log.losses[-100:])
    if not args.curve_only and state.is_main_process:
        results["qat_w4a4"] = {**quality(student, reference, args.n, args.sample_steps),
                               "call_mse": call_error(student, held_out)}
        print(f"QAT {args.preset}: {results['qat_w4a4']}", flush=True)
    if state.is_main_process:
        print(json.dumps(results, indent=2))
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
