"""vqz.train_qat: quantization-aware training with rank-decaying wrappers (QVGen), or of SVDQuant
layers with their kept branch, in one call."""
from __future__ import annotations

import copy
from dataclasses import replace

import torch

from .algorithms.svd import svd_quantize
from .api import STATE_ATTR, QuantState, resolve_target
from .calib import as_forward_loop
from .calib.sources import device_of, generates_inputs, to_device
from .calib.stats import collect_input_stats
from .config import QuantConfig, get_qat_preset
from .guard import guard_dtype
from .nn.timestep import bucket_edges
from .patch import Plan, Skipped, Transaction, architecture_fingerprint, plan_layers
from .pipelines import adapter_for
from .qat.data import record_calls, relabel
from .qat.model import unwrap, wrap
from .qat.schedule import DECAY_FRACTION, RankSchedule
from .qat.trainer import TrainLog, TrainOptions, train


def train_qat(obj, config="w4a4-qat", *, data, steps: int, teacher=None, decay_every: int | None = None,
              decay_start: int = 0, decay_fraction: float | None = None, **options) -> TrainLog:
    """Quantization-aware training of `obj` (an nn.Module or a diffusers pipeline, whose denoiser
    is trained) in place; afterwards its Linear layers are quantized layers as vqz.quantize makes
    them (vqz.save, vqz.summary and the kernels take them): plain ones, or SVDQuant's with the
    trained branch when the config keeps it. Returns the loss log.

    config: a QAT preset (`vqz.config.qat_presets()`) or a QuantConfig with learnable specs; its
    `rank` is the auxiliary branch's starting rank, or with `keep_branch` (w4a4-svd-qat) the rank
    of SVDQuant's 16-bit branch, trained and kept (no rank schedule: the decay arguments are then
    refused). data: what the full-precision model is run on to record its inputs and outputs
    (prompts for a pipeline, batches of model inputs, or a forward-loop callable, as `calib=` of
    vqz.quantize). teacher: a full-precision model of the same architecture whose outputs are the
    targets (default: `obj` itself before training). decay_every/decay_start: the rank schedule
    (steps per halving, first step of the decay); default: the phases spread over the first
    `decay_fraction` (default 0.75) of the steps. `options`: the fields of TrainOptions (lr,
    accumulate, records_per_step, lr_schedule, mixed_precision, out, resume, spike_threshold,
    refresh_every, ...). refresh_every re-runs `data` (prompts or a forward loop)
    on the student and relabels its calls by the teacher; without `teacher`, a full-precision copy
    of `obj`'s denoiser is kept for that (twice its memory).
    If training fails, `obj` is left as it was.
    """
    target = resolve_target(obj)
    cfg = get_qat_preset(config) if isinstance(config, str) else config
    _check_config(cfg)
    if getattr(target, STATE_ATTR, None) is not None:
        raise ValueError("this model is already quantized; train a fresh full-precision model")
    schedule = _schedule(cfg, steps, decay_every, decay_start, decay_fraction)
    opts = TrainOptions(steps=steps, schedule=schedule, **options)
    fingerprint = architecture_fingerprint(target)
    teacher_model = None if teacher is None else _same_architecture(resolve_target(teacher), target,
                                                                    fingerprint)
    if opts.refresh_every and not generates_inputs(data):
        raise ValueError("refresh_every re-records the student's own trajectories, which fixed "
                         "batches of inputs cannot give; pass prompts or a forward-loop callable "
                         "as data, or refresh_every=0")
    refresh_teacher = None
    if opts.refresh_every:
        refresh_teacher = teacher_model if teacher_model is not None else copy.deepcopy(target)
    plan = _linear_plan(target, cfg)
    identity = {"preset": cfg.name, "config": cfg.to_dict(), "schedule": schedule.to_dict(),
                "fingerprint": fingerprint}
    trainable = {p: p.requires_grad for p in target.parameters()}
    tx = Transaction(target)
    try:
        # Distillation compares student and teacher at the same inputs: no dropout, no label
        # dropping for guidance (diffusers drops class labels in training mode).
        target.eval()
        loop = as_forward_loop(data, obj, target)
        records = record_calls(target, loop)
        if teacher_model is not None:
            relabel(records, teacher_model)
        edges = _edges(records, cfg)
        svd = _svd(target, plan, records, cfg)
        smooth = {name: r.smooth for name, r in svd.items() if r.smooth is not None}
        kept = {name: r.lowrank for name, r in svd.items()
                if cfg.keep_branch and r.lowrank is not None}
        wrap(target, plan, edges, smooth, kept, tx)
        log = train(target, records, opts, identity,
                    _refresher(target, loop, refresh_teacher) if opts.refresh_every else None)
        unwrap(target, tx)
        tx.restore_modes()
    except BaseException:
        tx.rollback()
        raise
    finally:
        for p, flag in trainable.items():
            p.requires_grad_(flag)
    setattr(target, STATE_ATTR, QuantState(_exported_config(cfg),
                                           _exported_plan(plan, cfg.keep_branch), fingerprint,
                                           type(target).__name__))
    guard_dtype(target)
    return log


def _refresher(student, loop, teacher):
    """refresh(autocast) for the trainer: the student's calls along its own trajectories, with
    the teacher's outputs at them as targets."""
    def refresh(autocast):
        with torch.no_grad(), autocast():
            records = record_calls(student, loop)
        relabel(records, teacher)
        return records
    return refresh


def _schedule(cfg: QuantConfig, steps: int, every, start: int, fraction) -> RankSchedule:
    if cfg.keep_branch:
        if every is not None or start or fraction is not None:
            raise ValueError(f"config {cfg.name!r} keeps its low-rank branch (keep_branch=True), so "
                             f"it has no rank schedule; drop decay_every, decay_start and "
                             f"decay_fraction")
        return RankSchedule(0, 1)  # no decaying branch
    if every is not None:
        return RankSchedule(cfg.rank, every, start)
    return RankSchedule.fitted(cfg.rank, steps, DECAY_FRACTION if fraction is None else fraction)


def _check_config(cfg: QuantConfig) -> None:
    if not isinstance(cfg, QuantConfig):
        raise TypeError(f"config must be a QAT preset name or a vqz.QuantConfig, got {type(cfg).__name__}")
    if cfg.weight is None or not cfg.weight.learnable or (cfg.act is not None and not cfg.act.learnable):
        raise ValueError(f"config {cfg.name!r} is not a QAT recipe: its weight (and activation) specs "
                         f"need learnable=True; use a QAT preset such as 'w4a4-qat'")
    if cfg.gptq or cfg.attn is not None or cfg.polish or cfg.compensate or cfg.reconstruct \
            or cfg.repq:
        raise ValueError("QAT trains Linear layers only, without GPTQ, attention quantizers or "
                         "QuartDepth/RepQ steps; drop those fields from the config")


def _same_architecture(teacher, target, fingerprint: str):
    if getattr(teacher, STATE_ATTR, None) is not None:
        raise ValueError("the teacher is quantized; distil from the full-precision model")
    if architecture_fingerprint(teacher) != fingerprint:
        raise ValueError(f"the teacher is a {type(teacher).__name__} of another architecture than the "
                         f"{type(target).__name__} being trained; the teacher must be the "
                         f"full-precision model with the same class and config")
    return teacher


def _linear_plan(target, cfg: QuantConfig) -> Plan:
    adapter = adapter_for(target)
    full = plan_layers(target, cfg, adapter.default_rules)
    plan = Plan([p for p in full.layers if p.kind == "Linear"], list(full.skipped))
    plan.skipped += [Skipped(p.name, p.kind, "QAT wraps Linear layers only")
                     for p in full.layers if p.kind != "Linear"]
    if not plan.layers:
        raise ValueError(f"no Linear layer of {type(target).__name__} was selected for QAT")
    return plan


@torch.no_grad()
def _svd(target, plan: Plan, records, cfg: QuantConfig, calls: int = 64) -> dict:
    """{name: svd_quantize's result} for the layers that smooth (λ as SVDQuant chooses it, α
    searched with the starting branch in the loop, from the layers' inputs over the first `calls`
    recorded denoiser calls) or, with `cfg.keep_branch`, have a branch (its starting factors)."""
    layers = [p for p in plan.layers if p.smooth or (cfg.keep_branch and p.rank)]
    smoothed = [p.name for p in layers if p.smooth]
    stats = {}
    if smoothed:
        device = device_of(target)

        def loop():
            for r in records[:calls]:
                target(*to_device(r.args, device), **to_device(r.kwargs, device))

        stats = collect_input_stats(target, smoothed, loop)
    results = {}
    for p in layers:
        s = stats.get(p.name)
        results[p.name] = svd_quantize(
            target.get_submodule(p.name).weight, rank=p.rank, weight_spec=p.weight, act_spec=p.act,
            x_absmax=None if s is None else s.absmax, x_sample=None if s is None else s.sample,
            alpha=cfg.alpha, iters=cfg.svd_iters)
    return results


def _edges(records, cfg: QuantConfig):
    if cfg.timestep_buckets <= 1:
        return None
    timesteps = [r.timestep for r in records]
    if any(t is None for t in timesteps):
        raise ValueError(f"timestep_buckets={cfg.timestep_buckets} learns clip ratios per timestep "
                         f"range, but the model is called without a timestep; pass "
                         f"timestep_buckets=0 in the config")
    return bucket_edges(timesteps, cfg.timestep_buckets)


def _exported_config(cfg: QuantConfig) -> QuantConfig:
    return replace(cfg, weight=replace(cfg.weight, learnable=False),
                   rank=cfg.rank if cfg.keep_branch else 0)


def _exported_plan(plan: Plan, keep_branch: bool) -> Plan:
    return Plan([replace(p, weight=replace(p.weight, learnable=False),
                         rank=p.rank if keep_branch else 0) for p in plan.layers], plan.skipped)

