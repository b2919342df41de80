"""Fused Triton kernels for quantized layers and the dispatch that picks them.

`linear_impl(layer, x)` is the single place where a quantized layer's forward leaves the pure-torch
reference: it returns a callable running the layer on a fused kernel, or None to use the reference.
Triton is optional: without it (or without CUDA) every layer runs its reference path.
"""
from .dispatch import linear_impl, register_linear_kernel, triton_available
from .runtime import LAYOUTS, kernel_kind, prepare_model

__all__ = ["LAYOUTS", "kernel_kind", "linear_impl", "prepare_model", "register_linear_kernel",
           "triton_available"]
