"""Uniform reservoir sampling of rows: a fixed-size, unbiased sample of an unbounded stream."""
from __future__ import annotations

import torch


class RowReservoir:
    """Keeps at most `capacity` rows of everything passed to `add`, each row equally likely.

    Vectorised algorithm R: the t-th row seen (0-based) replaces a random slot with probability
    capacity / (t + 1). Deterministic for a given seed.
    """

    def __init__(self, capacity: int, seed: int = 0):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.seen = 0
        self._rows: torch.Tensor | None = None
        self._gen = torch.Generator().manual_seed(seed)

    def add(self, rows: torch.Tensor) -> None:
        """rows: [B, K]."""
        if self._rows is None:
            self._rows = rows.new_empty((0, rows.shape[1]))
        room = self.capacity - self._rows.shape[0]
        if room > 0:
            self._rows = torch.cat([self._rows, rows[:room]])
            self.seen += min(room, rows.shape[0])
            rows = rows[room:]
        if rows.shape[0] == 0:
            return
        positions = torch.arange(self.seen, self.seen + rows.shape[0], dtype=torch.float64)
        slots = (torch.rand(rows.shape[0], generator=self._gen, dtype=torch.float64)
                 * (positions + 1)).long()
        keep = slots < self.capacity
        self._rows[slots[keep].to(rows.device)] = rows[keep.to(rows.device)]
        self.seen += rows.shape[0]

    @property
    def sample(self) -> torch.Tensor:
        if self._rows is None:
            raise ValueError("nothing was observed")
        return self._rows
