"""Running a calibration loop with every layer of interest reporting its inputs."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def check_finite(name: str, tensors) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"calibration input of layer {name!r} contains NaN or inf; check the "
                             f"calibration data (or the model), or exclude the layer "
                             f"(exclude=[{name!r}])")


def run_with_input_hooks(modules: dict[str, nn.Module], on_input: Callable,
                         forward_loop: Callable[[], None]) -> None:
    """Run `forward_loop` without gradients; each call of a module in `modules` ({name: module})
    first checks its tensor inputs are finite, then calls on_input(name, module, tensors).
    Raises ValueError naming the modules the loop never reached."""
    reached: set[str] = set()

    def hook_for(name):
        def hook(module, args, kwargs):
            tensors = [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]
            check_finite(name, tensors)
            on_input(name, module, tensors)
            reached.add(name)
        return hook

    handles = [m.register_forward_pre_hook(hook_for(name), with_kwargs=True)
               for name, m in modules.items()]
    run_hooked(handles, forward_loop)
    missing = sorted(set(modules) - reached)
    if missing:
        raise ValueError(f"calibration never ran layer(s) {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}; give calibration inputs that reach "
                         f"them, or exclude them (exclude=[...])")


def run_hooked(handles, forward_loop) -> None:
    """Run `forward_loop()` without gradients, then remove the hooks `handles`, whatever happens."""
    try:
        with torch.no_grad():
            forward_loop()
    finally:
        for h in handles:
            h.remove()
