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
    """One denoiser call: its inputs (tensors on the CPU) and the teacher's output tensor."""

    args: tuple
    kwargs: dict
    target: torch.Tensor
    timestep: float | None

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
    """Replace every record's target by `teacher`'s output at the same inputs."""
    device = device_of(teacher)
    for r in records:
        r.target = r.predict(teacher, device).detach().cpu()
