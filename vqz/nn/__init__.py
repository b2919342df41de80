"""Quantized modules: drop-in replacements for nn.Linear, nn.Conv2d and activation products."""
from .base import QuantModule
from .conv import QuantConv2d
from .linear import QuantLinear
from .matmul import QuantMatMul
from .weight import QuantWeight

__all__ = ["QuantModule", "QuantLinear", "QuantConv2d", "QuantMatMul", "QuantWeight"]
