"""Calibration sources: whatever the user passed as `calib=`, as a `forward_loop()` callable."""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from os import PathLike
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from .pipeline import is_pipeline, pipeline_forward_loop
from .prompts import default_prompts, read_prompts


def as_forward_loop(calib, obj, model: nn.Module, *, passes: int = 1) -> Callable[[], None]:
    """A no-argument callable that runs calibration data through the model.

    calib: a callable `forward_loop(obj)`; or an iterable of model inputs, each a tensor
    (`model(x)`), a tuple/list (`model(*args)`) or a dict (`model(**kwargs)`). Tensors are moved to
    the model's device. `passes` > 1 means the loop will be called that many times, so a one-shot
    iterator is materialised first. When `obj` is a diffusers pipeline, calib may also be prompts:
    a list of strings, the path of a prompts file (see read_prompts) or "default" (vqz's bundled
    prompts); the pipeline then generates from them (pipeline_forward_loop, its default options).
    """
    if _is_forward_loop(calib):
        return lambda: calib(obj)
    if _is_prompts(calib):
        if not is_pipeline(obj):
            raise TypeError("calibration prompts need a diffusers pipeline (vqz.quantize(pipe, "
                            "...)); for a plain module pass model inputs or a forward_loop(model) "
                            "callable")
        return pipeline_forward_loop(obj, _prompts(calib))
    if isinstance(calib, torch.Tensor) or not isinstance(calib, Iterable):
        raise TypeError(f"calib must be a forward_loop callable or an iterable of model inputs "
                        f"(tensors, tuples or dicts), got {type(calib).__name__}; to use one "
                        f"tensor as one batch, pass [tensor]")
    if passes > 1 and iter(calib) is calib:
        calib = list(calib)
    device = device_of(model)

    def loop():
        count = 0
        for batch in tqdm(calib, desc="vqz calibration", unit="batch", leave=False):
            _call(model, batch, device)
            count += 1
        if count == 0:
            raise ValueError("the calibration data is empty; pass at least one input batch")
    return loop


def generates_inputs(calib) -> bool:
    """Whether `calib` makes the model's inputs as it runs (a forward loop, or prompts a pipeline
    generates from), rather than being fixed batches."""
    return _is_forward_loop(calib) or _is_prompts(calib)


def _is_forward_loop(calib) -> bool:
    return callable(calib) and not isinstance(calib, nn.Module)


def _is_prompts(calib) -> bool:
    """A prompts file's path, "default", or a list of prompt strings."""
    return isinstance(calib, (str, bytes, PathLike)) or (
        isinstance(calib, (list, tuple)) and len(calib) > 0 and all(isinstance(p, str) for p in calib))


def _prompts(calib) -> list[str]:
    if isinstance(calib, bytes):
        raise TypeError("calib: give a prompts file's path as str or pathlib.Path, not bytes")
    if calib == "default":
        return default_prompts()
    if isinstance(calib, str) and not Path(calib).is_file():
        raise FileNotFoundError(f"calib={calib!r} is neither 'default' nor an existing prompts file; "
                                f"to calibrate on this text as a prompt, pass a list: calib=[{calib!r}]")
    if isinstance(calib, (str, PathLike)):
        return read_prompts(calib)
    return list(calib)


def device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def to_device(value, device):
    """`value` with every tensor inside (tuples, lists, dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(to_device(v, device) for v in value)
    if isinstance(value, Mapping):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def _call(model: nn.Module, batch, device) -> None:
    if isinstance(batch, torch.Tensor):
        model(batch.to(device))
    elif isinstance(batch, Mapping):
        model(**{k: to_device(v, device) for k, v in batch.items()})
    elif isinstance(batch, (tuple, list)):
        model(*[to_device(v, device) for v in batch])
    else:
        raise TypeError(f"a calibration batch must be a tensor, a tuple/list of arguments or a dict "
                        f"of keyword arguments, got {type(batch).__name__}")
