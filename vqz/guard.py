"""Refusing dtype conversions of quantized models, which would silently lose precision.

A quantized model holds float32 scales and integer codes; `.half()` or `.to(torch.bfloat16)` would
round the scales and leave a model that no longer matches its checkpoint. `guard_dtype(model)`
makes every conversion of `model` that changes a floating dtype raise before any tensor is touched,
while moves between devices keep working.
"""
from __future__ import annotations

import torch
from torch import nn

# One probe per floating dtype a conversion could map to another: float32 catches .half() and
# .to(torch.bfloat16); float16 catches .float() and .to(torch.float32).
_PROBES = (torch.float32, torch.float16)


class _DtypeGuard:
    """Stands in for `module._apply` (on the instance): refuses conversion functions that change
    a floating dtype, then delegates to the class's own `_apply`. Holds the module itself, so deep
    copies and pickles of the module carry a guard bound to the copy."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __call__(self, fn, recurse: bool = True):
        for dtype in _PROBES:
            converted = fn(torch.empty(0, dtype=dtype)).dtype
            if converted != dtype:
                raise TypeError(
                    f"{type(self.module).__name__} is quantized by vqz: its scales are float32 and "
                    f"its codes integers, and converting {dtype} tensors to {converted} would lose "
                    f"precision, so the model was left unchanged. Move it with .to(device) only; "
                    f"inputs of any float dtype are accepted. For full-precision layers in another "
                    f"dtype, convert the full-precision model before vqz.quantize.")
        return type(self.module)._apply(self.module, fn, recurse)


def guard_dtype(model: nn.Module) -> nn.Module:
    """Make `model.to(dtype)`, `.half()`, `.bfloat16()`, `.float()`, `.double()` and `.type(...)`
    raise TypeError with the model left exactly as it was; `.to(device)`, `.cuda()` and `.cpu()`
    keep working. Idempotent. Returns `model`."""
    if not isinstance(model.__dict__.get("_apply"), _DtypeGuard):
        model._apply = _DtypeGuard(model)
    return model
