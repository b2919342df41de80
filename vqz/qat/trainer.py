"""The QAT training loop: distillation from recorded teacher outputs, on accelerate (one or several
GPUs or nodes, DDP or FSDP), with bf16 autocast, gradient checkpointing and checkpoint/resume."""
from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.sources import device_of
from ..quantizer import Quantizer
from .data import Record, merge_records
from .model import apply_schedule, qat_layers
from .schedule import RankSchedule
from .stability import clip_spikes, reset_moments

STATE_FILE = "qat.json"
LR_SCHEDULES = ("constant", "cosine")


@dataclass
class TrainOptions:
    """steps: optimizer steps. lr: of the weights, biases and branch; quant_lr: of the learned
    scales and clip ratios (default lr; 0 freezes them). lr_schedule: "constant", or "cosine"
    (from the learning rates down to 0 at the last step), after `warmup_steps` of linear warm-up.
    accumulate: micro-batches per step and process. records_per_step: recorded calls concatenated
    into each micro-batch (one forward over several timesteps; 1: one call per forward).
    mixed_precision: "bf16", "fp16" or "no" (default bf16 on CUDA, else no). out: folder for
    checkpoints and the loss log. checkpoint_every: steps between checkpoints (0: at the end only,
    when `out` is set). resume: a checkpoint folder to continue from. spike_threshold: SPAM's θ
    (clip g² > θ·v), None: off. reset_every: steps between optimizer-moment resets (0: only the
    branch's, when the rank schedule re-factorises it). timestep_weight: t -> loss weight.
    max_grad_norm: global gradient-norm clip (None: off). refresh_every: steps between re-recordings
    of the training calls along the student's own sampling trajectories, labelled by the teacher
    (0: train on the recorded full-precision trajectories throughout). guidance_loss: weight of the
    squared difference between the errors of the two halves of each call's batch, for denoisers
    called on the conditional and unconditional branches of classifier-free guidance together:
    the guided step multiplies that difference by the guidance scale (0: off)."""

    steps: int
    schedule: RankSchedule
    lr: float = 1e-4
    quant_lr: float | None = None
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    accumulate: int = 1
    records_per_step: int = 1
    mixed_precision: str | None = None
    gradient_checkpointing: bool = False
    out: str | Path | None = None
    checkpoint_every: int = 0
    resume: str | Path | None = None
    log_every: int = 10
    spike_threshold: float | None = None
    reset_every: int = 0
    timestep_weight: Callable[[float | None], float] | None = None
    max_grad_norm: float | None = 1.0
    refresh_every: int = 0
    guidance_loss: float = 0.0
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"steps must be a positive integer, got {self.steps!r}")
        if self.accumulate < 1:
            raise ValueError(f"accumulate must be >= 1, got {self.accumulate}")
        if self.quant_lr is not None and self.quant_lr < 0:
            raise ValueError(f"quant_lr must be >= 0 (0 freezes the quantizers), got {self.quant_lr}")
        if self.guidance_loss < 0:
            raise ValueError(f"guidance_loss must be >= 0, got {self.guidance_loss}")
        if self.refresh_every < 0:
            raise ValueError(f"refresh_every must be >= 0, got {self.refresh_every}")
        if self.records_per_step < 1:
            raise ValueError(f"records_per_step must be >= 1, got {self.records_per_step}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; use one of: "
                             f"{', '.join(LR_SCHEDULES)}")
        if not 0 <= self.warmup_steps < self.steps:
            raise ValueError(f"warmup_steps must be in [0, steps), got {self.warmup_steps} for "
                             f"{self.steps} steps")
        self.schedule.check_fits(self.steps)


@dataclass
class TrainLog:
    """losses[i]: the mean distillation loss of step start + i over all processes; ranks[i]: the
    decaying branch's rank at that step (0 throughout when the config keeps its branch)."""

    start: int
    losses: list
    ranks: list
    seconds: float
    samples: int  # teacher-labelled samples seen, all processes together

    @property
    def samples_per_second(self) -> float:
        return self.samples / max(self.seconds, 1e-9)


def train(model: nn.Module, records: list[Record], opts: TrainOptions, identity: dict,
          refresh: Callable | None = None) -> TrainLog:
    """Train the QAT wrappers of `model` (every other parameter stays frozen) to reproduce the
    records' targets. `identity` (JSON) describes the run; a resumed checkpoint must match it.
    `refresh(autocast)`: new records from the model as it now is (needed by opts.refresh_every;
    `autocast` is the context its forwards may run under). Afterwards (or on failure) `model` is a
    plain module again, on the device it came on."""
    if opts.refresh_every and refresh is None:
        raise ValueError("refresh_every needs a way to re-record the training calls (refresh=)")
    from accelerate import Accelerator, DistributedDataParallelKwargs

    start = _resume_step(opts.resume, identity) if opts.resume else 0
    mixed = opts.mixed_precision or ("bf16" if torch.cuda.is_available() else "no")
    # a step trains the clip ratios of one timestep range only: the others get no gradient
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(mixed_precision=mixed, gradient_accumulation_steps=opts.accumulate,
                              kwargs_handlers=[ddp])
    checkpointing = opts.gradient_checkpointing
    if checkpointing and not hasattr(model, "enable_gradient_checkpointing"):
        raise ValueError(f"{type(model).__name__} has no enable_gradient_checkpointing(); "
                         f"train without gradient_checkpointing")
    optimizer = _optimizer(model, opts)
    home = device_of(model)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    try:
        if checkpointing:
            model.enable_gradient_checkpointing()
        if opts.resume:
            accelerator.load_state(str(opts.resume))
        log = _loop(accelerator, prepared, optimizer, records, opts, identity, start, refresh)
        if opts.out:
            save_checkpoint(accelerator, Path(opts.out) / f"checkpoint-{opts.steps}", opts.steps,
                            identity)
            if accelerator.is_main_process:
                _write_log(Path(opts.out), log, accelerator.num_processes)
        accelerator.wait_for_everyone()
    finally:
        # back to a plain module where it was: no autocast wrapper left on forward
        accelerator.unwrap_model(prepared, keep_fp32_wrapper=False).to(home)
        if checkpointing:
            model.disable_gradient_checkpointing()
        accelerator.free_memory()
    return log


def _loop(accelerator, model, optimizer, records, opts: TrainOptions, identity: dict,
          start: int, refresh) -> TrainLog:
    inner = accelerator.unwrap_model(model)
    layers = list(qat_layers(inner).values())  # looked up once: the schedule runs every step
    branch = [p for layer in layers for p in (layer.lora_down, layer.lora_up)]
    fsdp = accelerator.distributed_type.name == "FSDP"
    order = _Order(len(records), accelerator.num_processes, accelerator.process_index, opts.seed)
    if order.per_process < opts.records_per_step:
        raise ValueError(f"records_per_step={opts.records_per_step} needs that many recorded calls "
                         f"per process, got {order.per_process}; give more data or merge fewer")
    base_lrs = _group_lrs(opts)  # not the optimizer's: a resumed state holds scheduled ones
    losses, ranks, samples = [], [], 0
    began = time.perf_counter()
    bar = tqdm(range(start, opts.steps), desc="vqz qat", unit="step", initial=start,
               total=opts.steps, disable=not accelerator.is_local_main_process)
    for step in bar:
        with _full_params(model) if fsdp else nullcontext():
            refactored = apply_schedule(layers, opts.schedule, step)
            # a resumed run re-records first, as the uninterrupted one did at its last refresh
            if opts.refresh_every and step >= opts.refresh_every and \
                    (step % opts.refresh_every == 0 or step == start):
                records = refresh(accelerator.autocast)
                order = _Order(len(records), accelerator.num_processes,
                               accelerator.process_index, opts.seed)
        if refactored or (opts.reset_every and step and step % opts.reset_every == 0):
            reset_moments(optimizer, None if fsdp or not refactored else branch)
        factor = lr_factor(opts, step)
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["lr"] = base * factor
        total = torch.zeros((), device=accelerator.device)
        for micro in range(opts.accumulate):
            first = (step * opts.accumulate + micro) * opts.records_per_step
            record = merge_records([records[order[first + j]] for j in range(opts.records_per_step)])
            with accelerator.accumulate(model):
                loss = _loss(model, record, accelerator, opts)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    _clip(accelerator, model, optimizer, opts)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
            samples += record.target.shape[0] * accelerator.num_processes
        loss_value = accelerator.reduce(total / opts.accumulate, "mean").item()
        losses.append(loss_value)
        kept, fading, _ = opts.schedule.state(step)
        ranks.append(kept + fading)
        if step % opts.log_every == 0 or step == opts.steps - 1:
            bar.set_postfix(loss=f"{loss_value:.4g}", rank=ranks[-1])
        # the last step's checkpoint is written by train(), after the schedule's final state
        if opts.out and opts.checkpoint_every and (step + 1) % opts.checkpoint_every == 0 \
                and step + 1 < opts.steps:
            save_checkpoint(accelerator, Path(opts.out) / f"checkpoint-{step + 1}", step + 1, identity)
    apply_schedule(layers, opts.schedule, opts.steps)
    return TrainLog(start, losses, ranks, time.perf_counter() - began, samples)


def lr_factor(opts: TrainOptions, step: int) -> float:
    """The learning rates' multiplier at `step`: linear warm-up, then the schedule."""
    if step < opts.warmup_steps:
        return (step + 1) / opts.warmup_steps
    if opts.lr_schedule == "cosine":
        progress = (step - opts.warmup_steps) / max(opts.steps - 1 - opts.warmup_steps, 1)
        return (1 + math.cos(math.pi * progress)) / 2
    return 1.0


def _group_lrs(opts: TrainOptions) -> list[float]:
    """The learning rates of the optimizer's two groups: the weights, biases and branch; the
    quantizers' scales and clip ratios."""
    return [opts.lr, opts.lr if opts.quant_lr is None else opts.quant_lr]


def _optimizer(model: nn.Module, opts: TrainOptions) -> torch.optim.Optimizer:
    layers = list(qat_layers(model).values())
    if not layers:
        raise ValueError("the model has no QAT wrappers to train")
    model.requires_grad_(False)
    quant, other = [], []
    for layer in layers:
        layer.requires_grad_(True)
        for module in layer.modules():
            own = list(module.parameters(recurse=False))
            (quant if isinstance(module, Quantizer) else other).extend(own)
    groups = [{"params": params, "lr": lr} for params, lr in zip((other, quant), _group_lrs(opts))]
    return torch.optim.AdamW(groups, weight_decay=0.0)


def _loss(model, record: Record, accelerator, opts: TrainOptions) -> torch.Tensor:
    """The mean over samples of each recorded call's distillation loss (times its timestep's
    weight): the squared error, plus `guidance_loss` times the squared difference of the errors
    of its two halves."""
    device = accelerator.device
    with accelerator.autocast():
        out = record.predict(model, device)
    error = out.float() - record.target.to(device).float()
    weight, pair = opts.timestep_weight, opts.guidance_loss
    if weight is None and not pair:
        return error.pow(2).mean()
    parts = record.parts or [(error.shape[0], record.timestep)]
    total = 0.0
    for e, (n, t) in zip(error.split([n for n, _ in parts]), parts):
        loss = e.pow(2).mean()
        if pair:
            if n % 2:
                raise ValueError(f"guidance_loss pairs the two halves of each call's batch (the "
                                 f"branches of classifier-free guidance); a call has {n} samples")
            first, second = e.chunk(2)
            loss = loss + pair * (first - second).pow(2).mean()
        total = total + loss * (n if weight is None else n * float(weight(t)))
    return total / error.shape[0]


def _clip(accelerator, model, optimizer, opts: TrainOptions) -> None:
    if opts.spike_threshold is None and opts.max_grad_norm is None:
        return
    accelerator.unscale_gradients()
    if opts.spike_threshold is not None:
        clip_spikes(optimizer, opts.spike_threshold)
    if opts.max_grad_norm is not None:
        accelerator.clip_grad_norm_(model.parameters(), opts.max_grad_norm)


def _full_params(model):
    from torch.distributed.fsdp import FullyShardedDataParallel

    return FullyShardedDataParallel.summon_full_params(model, writeback=True)


class _Order:
    """Which record each process trains on at micro-step m: every epoch a fresh permutation (seeded,
    the same on every process), dealt out round-robin so the processes never share a record."""

    def __init__(self, n: int, processes: int, index: int, seed: int):
        self.per_process = n // processes
        if self.per_process == 0:
            raise ValueError(f"{n} training batches cannot be shared by {processes} processes; "
                             f"give more data (prompts or batches)")
        self.n, self.processes, self.index, self.seed = n, processes, index, seed
        self._epoch, self._perm = None, None

    def __getitem__(self, m: int) -> int:
        epoch, position = divmod(m, self.per_process)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=generator).tolist()
        return self._perm[position * self.processes + self.index]


def save_checkpoint(accelerator, folder: Path, step: int, identity: dict) -> None:
    """Model, optimizer and RNG states (accelerate), and `qat.json`: the run's identity and step."""
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STATE_FILE).write_text(json.dumps({**identity, "step": step}, indent=2))
    accelerator.wait_for_everyone()


def _resume_step(folder, identity: dict) -> int:
    """The step a checkpoint folder continues from, once its run's identity is checked."""
    folder = Path(folder)
    state_file = folder / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{folder} is not a vqz QAT checkpoint (no {STATE_FILE}); resume from "
                                f"a checkpoint-<step> folder written by an earlier run")
    saved = json.loads(state_file.read_text())
    different = sorted(k for k in identity if saved.get(k) != identity[k])
    if different:
        raise ValueError(f"the checkpoint {folder} was written by another run (preset "
                         f"{saved.get('preset')!r}): its {', '.join(different)} differ from this "
                         f"run's; resume with the same model, preset and schedule, or start afresh")
    return int(saved["step"])


def _write_log(out: Path, log: TrainLog, processes: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "train_log.csv", "w") as f:
        f.write("step,loss,rank\n")
        for i, (loss, rank) in enumerate(zip(log.losses, log.ranks)):
            f.write(f"{log.start + i},{loss:.6g},{rank}\n")
    summary = {"steps": log.start + len(log.losses), "seconds": round(log.seconds, 2),
               "samples_per_second": round(log.samples_per_second, 2), "processes": processes}
    (out / "train_summary.json").write_text(json.dumps(summary, indent=2))
