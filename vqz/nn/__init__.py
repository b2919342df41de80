"""Quantized modules: drop-in replacements for nn.Linear, nn.Conv2d, activation products and attention."""
from .attention import QuantAttentionBase, attention_wrapper
from .base import QuantModule
from .conv import QuantConv2d
from .linear import QuantLinear
from .matmul import QuantMatMul
from .timm_attention import (QuantAttention, QuantBeitAttention, QuantEvaAttention,
                             QuantWindowAttention)
from .weight import QuantWeight

__all__ = ["QuantModule", "QuantAttentionBase", "QuantAttention", "QuantWindowAttention",
           "QuantEvaAttention", "QuantBeitAttention", "QuantLinear", "QuantConv2d", "QuantMatMul",
           "QuantWeight", "attention_wrapper"]
