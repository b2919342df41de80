"""Quantized modules: drop-in replacements for nn.Linear, nn.Conv2d, activation products and attention."""
from .attention import QuantAttention
from .base import QuantModule
from .conv import QuantConv2d
from .linear import QuantLinear
from .matmul import QuantMatMul
from .weight import QuantWeight

__all__ = ["QuantModule", "QuantAttention", "QuantLinear", "QuantConv2d", "QuantMatMul", "QuantWeight"]
