"""The rank-decay schedule of the QAT low-rank branch (QVGen).

From `start`, every `every` steps is one phase: the branch's rank r is halved (the top r // 2
singular directions are kept), and the dropped half fades out by u = (1 + cos(pi t / every)) / 2,
t the step within the phase, reaching 0 at the phase's end. 32 -> 16 -> ... -> 1 -> 0 is six phases;
after the last one the branch is gone and the layer is a plain quantized layer.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

DECAY_FRACTION = 0.75  # share of the training steps the decay is spread over, by default


def decay_ranks(rank: int) -> list[int]:
    """The ranks after each phase: 32 -> [16, 8, 4, 2, 1, 0]; 24 -> [12, 6, 3, 1, 0]."""
    ranks = []
    while rank > 0:
        rank //= 2
        ranks.append(rank)
    return ranks


@dataclass(frozen=True)
class RankSchedule:
    """rank: the starting rank; every: steps per phase (T_d); start: the step the first phase
    begins (steps before it train at the full rank)."""

    rank: int
    every: int
    start: int = 0

    def __post_init__(self):
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be an integer >= 0, got {self.rank!r}")
        if self.rank and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"decay_every must be a positive number of steps, got {self.every!r}")
        if self.start < 0:
            raise ValueError(f"decay_start must be >= 0, got {self.start}")

    @classmethod
    def fitted(cls, rank: int, steps: int, decay_fraction: float = DECAY_FRACTION) -> RankSchedule:
        """The phases spread evenly over the first `decay_fraction` of `steps`, so the rest trains
        the plain quantized layers."""
        if not 0 < decay_fraction <= 1:
            raise ValueError(f"decay_fraction must be in (0, 1], got {decay_fraction}")
        phases = len(decay_ranks(rank))
        if phases and int(steps * decay_fraction) < phases:
            raise ValueError(f"rank {rank} decays in {phases} phases, which need at least {phases} "
                             f"steps in the first {decay_fraction:.0%} of training; got {steps} steps")
        return cls(rank, int(steps * decay_fraction) // phases if phases else 1)

    @property
    def phases(self) -> int:
        return len(decay_ranks(self.rank))

    @property
    def end(self) -> int:
        """The first step at rank 0."""
        return self.start + self.phases * self.every

    def check_fits(self, steps: int) -> None:
        """Raise ValueError unless the branch reaches rank 0 within `steps` training steps."""
        if self.end > steps:
            phases = self.phases
            raise ValueError(
                f"the rank schedule does not fit {steps} steps: {phases} phases (rank {self.rank} -> 0) "
                f"of {self.every} steps from step {self.start} end at step {self.end}; use "
                f"decay_every <= {max(0, steps - self.start) // max(phases, 1)} or train "
                f"{self.end} steps or more")

    def phase(self, step: int) -> int | None:
        """The phase (0-based) in progress at `step`, or None before the first and after the last."""
        if step < self.start or step >= self.end:
            return None
        return (step - self.start) // self.every

    def state(self, step: int) -> tuple[int, int, float]:
        """(kept, fading, u) at `step`: `kept` directions at full weight, the next `fading` ones
        multiplied by u (0 < u <= 1); every direction beyond is zero."""
        if step < self.start:
            return self.rank, 0, 1.0
        ranks = [self.rank] + decay_ranks(self.rank)
        p = self.phase(step)
        if p is None:
            return 0, 0, 1.0
        t = (step - self.start) % self.every
        return ranks[p + 1], ranks[p] - ranks[p + 1], (1 + math.cos(math.pi * t / self.every)) / 2

    def to_dict(self) -> dict:
        return {"rank": self.rank, "every": self.every, "start": self.start}
