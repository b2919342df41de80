"""Streaming statistics of layer inputs, in bounded memory whatever the number of batches."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from .hooks import run_with_input_hooks
from .reservoir import RowReservoir


class InputStats:
    """Per-input-channel minimum, maximum and absmax (exact, running) and a uniform sample of input
    rows. Inputs are viewed as rows [-1, K] with K the last dim (Linear inputs).
    """

    def __init__(self, max_rows: int = 2048, seed: int = 0):
        self.min = self.max = None
        self.rows = RowReservoir(max_rows, seed)

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        lo, hi = x.aminmax(dim=0)
        self.min = lo if self.min is None else torch.minimum(self.min, lo)
        self.max = hi if self.max is None else torch.maximum(self.max, hi)
        self.rows.add(x)

    @property
    def absmax(self) -> torch.Tensor:
        return torch.maximum(self.min.abs(), self.max.abs())

    def divide_and_shift(self, divisor: torch.Tensor, shift: torch.Tensor) -> None:
        """The statistics of x / divisor + shift (per channel; divisor > 0): after a
        function-preserving reparameterization changed what the layer receives."""
        self.min, self.max = self.min / divisor + shift, self.max / divisor + shift
        self.rows.transform(lambda rows: rows / divisor + shift)

    @property
    def sample(self) -> torch.Tensor:
        return self.rows.sample


def collect_input_stats(model: nn.Module, names: list[str], forward_loop: Callable[[], None],
                        max_rows: int = 2048) -> dict[str, InputStats]:
    """Run the loop once and return {layer name: InputStats of its input} for the named layers."""
    stats = {name: InputStats(max_rows) for name in names}
    modules = {name: model.get_submodule(name) for name in names}
    run_with_input_hooks(modules, lambda name, m, tensors: stats[name].update(tensors[0]),
                         forward_loop)
    return stats
