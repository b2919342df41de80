"""Running calibration data through quantized layers with their activation observers on."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


def observe_layers(layers: dict[str, nn.Module], forward_loop: Callable[[], None]) -> None:
    """Calibrate the static activation quantizers of `layers` ({name: QuantModule}).

    Activation fake-quantization is off while the loop runs, so each layer observes the inputs the
    full-precision activations give it. Raises ValueError naming the layer if an input holds NaN or
    inf, or if the loop never reached a layer that needs calibration.
    """
    targets = {name: m for name, m in layers.items() if m.needs_calibration()}
    if not targets:
        return
    reached: set[str] = set()
    handles = [m.register_forward_pre_hook(_observer_hook(name, reached), with_kwargs=True)
               for name, m in targets.items()]
    for m in layers.values():
        m.act_enabled = False
    try:
        with torch.no_grad():
            forward_loop()
    finally:
        for h in handles:
            h.remove()
        for m in layers.values():
            m.act_enabled = True
    missing = sorted(set(targets) - reached)
    if missing:
        raise ValueError(f"calibration never ran layer(s) {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}; give calibration inputs that reach "
                         f"them, or exclude them (exclude=[...])")
    for m in targets.values():
        m.finalize_activations()


def check_finite(name: str, tensors) -> None:
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"calibration input of layer {name!r} contains NaN or inf; check the "
                             f"calibration data (or the model), or exclude the layer "
                             f"(exclude=[{name!r}])")


def _observer_hook(name: str, reached: set):
    def hook(module, args, kwargs):
        inputs = [*args, *kwargs.values()]
        check_finite(name, inputs)
        module.observe(*[t for t in inputs if isinstance(t, torch.Tensor)])
        reached.add(name)
    return hook
