"""Uniform sampling of rows from an unbounded stream, in fixed memory."""
from __future__ import annotations

import torch


class RowReservoir:
    """Keeps a uniform sample, without replacement, of at most `capacity` of the rows passed to
    `add`: every row gets a random key and the rows with the smallest keys are kept. Deterministic
    for a given seed."""

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.seed = capacity, seed
        self._rows = self._keys = self._generator = None

    def add(self, rows: torch.Tensor) -> None:
        """rows: [B, K]; copied, so the caller may reuse their memory."""
        if self._rows is None:
            self._generator = torch.Generator(device=rows.device).manual_seed(self.seed)
            self._keys, self._rows = rows.new_empty(0), rows.new_empty(0, *rows.shape[1:])
        keys = torch.cat([self._keys, torch.rand(rows.shape[0], generator=self._generator,
                                                 device=rows.device)])
        rows = torch.cat([self._rows, rows])
        if keys.numel() > self.capacity:
            keys, keep = keys.topk(self.capacity, largest=False)
            rows = rows[keep]
        self._keys, self._rows = keys, rows

    def transform(self, fn) -> None:
        """Replace the kept rows by fn(rows) (the same rows, changed the way the stream would be)."""
        self._rows = fn(self.sample)

    @property
    def sample(self) -> torch.Tensor:
        if self._rows is None:
            raise ValueError("nothing was observed")
        return self._rows
