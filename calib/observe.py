"""Running calibration data through quantized layers with their activation observers on."""
from __future__ import annotations

from typing import Callable

from torch import nn

from .hooks import run_with_input_hooks


def observe_layers(layers: dict[str, nn.Module], forward_loop: Callable[[], None]) -> None:
    """Calibrate the static activation quantizers of `layers` ({name: QuantModule}).

    Activation fake-quantization is off while the loop runs, so each layer observes the inputs the
    full-precision activations give it. Raises ValueError naming the layer if an input holds NaN or
    inf, or if the loop never reached a layer that needs calibration.
    """
    targets = {name: m for name, m in layers.items() if m.needs_calibration()}
    if not targets:
        return
    for m in layers.values():
        m.act_enabled = False
    try:
        run_with_input_hooks(targets, lambda name, m, tensors: m.observe(*tensors), forward_loop)
    finally:
        for m in layers.values():
            m.act_enabled = True
    for m in targets.values():
        m.finalize_activations()
