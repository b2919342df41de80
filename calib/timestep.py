"""Knowing which denoising step a denoiser call belongs to, for per-timestep statistics."""
from __future__ import annotations

import functools
import inspect

import torch
from torch import nn


class TimestepTracker:
    """Records the timestep of every call of a denoiser while active (a context manager; each
    `with` starts a fresh history).

        with TimestepTracker(pipe.unet) as steps:
            pipe(prompt)
        steps.history  # [999.0, 978.6, ..., 0.0], one float per denoiser call

    The timestep is read from the `timestep` argument of `type(denoiser).forward`, given by keyword
    or by position. A tensor holding a batch of timesteps gives its first element: within one
    denoising step every sample of the batch (both guidance branches included) is at the same
    timestep. Values are in the pipeline's own units (scheduler indices 0..999 for most, sigmas
    for some flow-matching pipelines). `current` is None before the first call, and at every call
    of a denoiser without a `timestep` argument.
    """

    def __init__(self, denoiser: nn.Module):
        self.denoiser = denoiser
        self.current: float | None = None
        self.history: list[float | None] = []
        self._handle = None

    def __enter__(self) -> TimestepTracker:
        self.current, self.history = None, []
        self._handle = self.denoiser.register_forward_pre_hook(self._record, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self._handle.remove()
        self._handle = None

    def _record(self, module, args, kwargs) -> None:
        self.current = timestep_of(module, args, kwargs)
        self.history.append(self.current)


@functools.lru_cache(maxsize=None)
def _forward_signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def timestep_arg(module: nn.Module, args: tuple, kwargs: dict):
    """The `timestep` argument of one call of `module` (a forward pre-hook's view of it) as given
    (a tensor or a number), or None when its forward has no `timestep` argument."""
    if "timestep" in kwargs:
        return kwargs["timestep"]
    signature = _forward_signature(type(module))
    if "timestep" not in signature.parameters:
        return None
    return signature.bind_partial(module, *args, **kwargs).arguments.get("timestep")


def timestep_of(module: nn.Module, args: tuple, kwargs: dict) -> float | None:
    """The timestep of one call of `module` (a forward pre-hook's view of it) as a float, or None
    when its forward has no `timestep` argument (see TimestepTracker for the conventions)."""
    t = timestep_arg(module, args, kwargs)
    if t is None:
        return None
    if isinstance(t, torch.Tensor):
        # .item() waits for the device once per denoiser call, which is negligible.
        return float(t.reshape(-1)[0].item())
    return float(t)
