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
    inside = [m for m in targets.values() if m.observes_in_forward]
    for m in layers.values():
        m.act_enabled = False
    for m in inside:
        m.observing = True
    try:
        # Hooks still check and count the inputs of `inside` layers; those observe in forward.
        run_with_input_hooks(targets, lambda name, m, tensors: None if m.observes_in_forward
                             else m.observe(*tensors), forward_loop)
    finally:
        for m in layers.values():
            m.act_enabled = True
        for m in inside:
            m.observing = False
    for m in targets.values():
        m.finalize_activations()
