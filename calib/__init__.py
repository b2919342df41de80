"""Calibration: turning user data into forward passes, and observing layer inputs during them."""
from .observe import observe_layers
from .sources import as_forward_loop

__all__ = ["as_forward_loop", "observe_layers"]
