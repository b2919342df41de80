"""Training data for distillation: the inputs of every call of the full-precision denoiser and
what it answered, recorded while a forward loop (a pipeline generating from prompts, or the
user's batches) runs it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..calib.hooks import run_hooked
from ..calib.sources import device_of, to_device
from ..calib.timestep import timestep_of


@dataclass
class Record:
    """One denoiser call: its inputs (tensors on the CPU) and the teacher's output tensor. A merged
    record (`merge_records`) has `parts`: (samples, timestep) of each call in it, and no single
    `timestep`."""

    args: tuple
    kwargs: dict
    target: torch.Tensor
    timestep: float | None
    parts: list | None = None

    def predict(self, model: nn.Module, device) -> torch.Tensor:
        """`model`'s prediction at this call's inputs, moved to `device`."""
        return first_tensor(model(*to_device(self.args, device), **to_device(self.kwargs, device)))


def first_tensor(output) -> torch.Tensor:
    """The prediction in a denoiser's output: a tensor, the first item of a tuple, or `.sample`."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot find the prediction tensor in a {type(output).__name__} output")


def record_calls(model: nn.Module, forward_loop: Callable[[], None]) -> list[Record]:
    """Run `forward_loop` and record every call of `model` (inputs and output, on the CPU)."""
    records = []

    def hook(module, args, kwargs, output):
        records.append(Record(to_device(args, "cpu"), to_device(kwargs, "cpu"),
                              first_tensor(output).detach().cpu(), timestep_of(module, args, kwargs)))

    run_hooked([model.register_forward_hook(hook, with_kwargs=True)], forward_loop)
    if not records:
        raise ValueError("the training data never called the model; pass prompts for a pipeline, "
                         "or batches of the model's inputs")
    return records


@torch.no_grad()
def relabel(records: list[Record], teacher: nn.Module) -> None:
    """Replace every record's target by `teacher`'s output (in eval mode) at the same inputs."""
    device = device_of(teacher)
    was_training = teacher.training
    teacher.eval()
    try:
        for r in records:
            r.target = r.predict(teacher, device).detach().cpu()
    finally:
        teacher.train(was_training)


def merge_records(records: list[Record]) -> Record:
    """One call of the denoiser on the samples of all `records` (concatenated along the batch;
    a timestep given once per call becomes one per sample), so one forward trains on several
    timesteps. Inputs that are the same in every call (a config flag, a shared embedding) are kept
    once; any other difference cannot be batched and raises ValueError."""
    if len(records) == 1:
        return records[0]
    sizes = [r.target.shape[0] for r in records]
    try:
        args = _merge([r.args for r in records], sizes)
        kwargs = _merge([r.kwargs for r in records], sizes)
        target = torch.cat([r.target for r in records])
    except (ValueError, RuntimeError) as e:
        raise ValueError(f"these denoiser calls cannot be batched together ({e}); train on one "
                         f"call per forward (records_per_step=1)") from e
    return Record(args, kwargs, target, None, [(n, r.timestep) for n, r in zip(sizes, records)])


def _merge(values: list, sizes: list[int]):
    """The leaves of `values` (one nested input per call) merged: tensors with a batch dimension
    concatenated, per-call scalars (the timestep) expanded to their call's samples."""
    first = values[0]
    if isinstance(first, (tuple, list)):
        if any(len(v) != len(first) for v in values):
            raise ValueError("the calls have different numbers of arguments")
        return type(first)(_merge(list(items), sizes) for items in zip(*values))
    if isinstance(first, dict):
        if any(v.keys() != first.keys() for v in values):
            raise ValueError("the calls have different keyword arguments")
        return {k: _merge([v[k] for v in values], sizes) for k in first}
    if isinstance(first, torch.Tensor):
        if all(v.dim() and v.shape[0] == n for v, n in zip(values, sizes)):
            return torch.cat(values)
        if all(torch.equal(v, first) for v in values[1:]):
            return first
        if all(v.numel() == 1 for v in values):
            return torch.cat([v.reshape(1).expand(n) for v, n in zip(values, sizes)])
        raise ValueError(f"an input of shape {tuple(first.shape)} differs between calls and has "
                         f"no batch dimension")
    if all(v == first for v in values[1:]):
        return first
    if all(isinstance(v, (int, float)) for v in values):
        return torch.cat([torch.full((n,), float(v)) for v, n in zip(values, sizes)])
    raise ValueError(f"an input ({type(first).__name__}) differs between calls")
