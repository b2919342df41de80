"""What every quantized module shares: activation quantizers that can be paused for calibration."""
from __future__ import annotations

import torch
from torch import nn

from ..quantizer import Quantizer


class QuantModule(nn.Module):
    """Base of QuantLinear, QuantConv2d and QuantMatMul.

    `act_enabled` switches activation fake-quantization off while calibration observes full-precision
    inputs through `observe(*inputs)`; `finalize_activations()` then fixes the static scales.
    """

    act_enabled: bool = True
    # True for modules whose quantizer inputs are computed inside forward (attention products):
    # calibration sets their `observing` flag instead of handing them their inputs.
    observes_in_forward: bool = False

    def act_quantizers(self) -> list[nn.Module]:
        """The activation quantizers (Quantizer or BucketedQuantizer) of this layer."""
        raise NotImplementedError

    def observe(self, *inputs: torch.Tensor) -> None:
        raise NotImplementedError

    def needs_calibration(self) -> bool:
        return any(not q.spec.dynamic for q in self.act_quantizers())

    def finalize_activations(self) -> None:
        for q in self.act_quantizers():
            if not q.spec.dynamic:
                q.finalize()


def quantize_channels_last(quantizer: Quantizer, x: torch.Tensor) -> torch.Tensor:
    """Apply an activation quantizer to NCHW `x` with channels as the last (K) dim."""
    return quantizer(x.movedim(1, -1)).movedim(-1, 1)
