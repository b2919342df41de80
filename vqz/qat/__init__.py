"""Rank-decaying quantization-aware training (QVGen): wrappers, schedule, trainer."""
from .linear import QATLinear
from .schedule import RankSchedule

__all__ = ["QATLinear", "RankSchedule"]
