"""Choosing a fused kernel for a quantized layer, or the reference path.

Kernel modules register a predicate and an implementation; the first whose predicate accepts the
layer and input (device, dtype, shapes, formats) wins. Kernels register themselves only where Triton
and CUDA exist, so elsewhere the reference path runs.
"""
from __future__ import annotations

import importlib.util
from typing import Callable

_LINEAR_KERNELS: list[tuple[Callable, Callable]] = []


def triton_available() -> bool:
    """Triton is importable (it is an optional dependency)."""
    return importlib.util.find_spec("triton") is not None


def register_linear_kernel(accepts: Callable, run: Callable) -> None:
    """Register `run(layer, x) -> y` for the layers and inputs where `accepts(layer, x)` is true."""
    _LINEAR_KERNELS.append((accepts, run))


def linear_impl(layer, x) -> Callable | None:
    """The fused implementation for this layer and input, or None for the pure-torch reference."""
    for accepts, run in _LINEAR_KERNELS:
        if accepts(layer, x):
            return run
    return None
