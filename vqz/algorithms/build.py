"""Turning one full-precision layer into its quantized replacement, following its LayerPlan."""
from __future__ import annotations

from torch import nn

from ..config import QuantConfig
from ..nn import QuantConv2d, QuantLinear, QuantModule
from ..patch import LayerPlan
from .svd import svd_quantize


def quantize_layer(module: nn.Module, plan: LayerPlan, cfg: QuantConfig, stats=None) -> QuantModule:
    """Round-to-nearest with the plan's observers; for Linear layers with smoothing or a low-rank
    branch, SVDQuant first (`stats`: the layer's calib.stats.InputStats, needed for smoothing)."""
    if plan.kind == "Conv2d":
        return QuantConv2d.from_float(module, plan.weight, plan.act, plan.splits)
    if not (plan.smooth or plan.rank):
        return QuantLinear.from_float(module, plan.weight, plan.act)
    if plan.smooth and stats is None:
        raise ValueError(f"smoothing layer {plan.name!r} needs calibration statistics")
    result = svd_quantize(
        module.weight, rank=plan.rank, weight_spec=plan.weight, act_spec=plan.act,
        x_absmax=stats.absmax if plan.smooth else None,
        x_sample=stats.sample if plan.smooth else None, alpha=cfg.alpha, iters=cfg.svd_iters)
    return QuantLinear.from_float(module, plan.weight, plan.act, smooth=result.smooth,
                                  lowrank=result.lowrank)


def empty_layer(module: nn.Module, plan: LayerPlan) -> QuantModule:
    """The quantized layer `plan` describes, with uninitialised tensors on `module`'s device (meta
    included), ready to receive a checkpoint's state."""
    w = module.weight
    factory = {"device": w.device, "dtype": w.dtype}
    if plan.kind == "Conv2d":
        return QuantConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                           module.padding, module.dilation, module.groups, module.bias is not None,
                           module.padding_mode, weight_spec=plan.weight, act_spec=plan.act,
                           splits=plan.splits, **factory)
    return QuantLinear(module.in_features, module.out_features, module.bias is not None,
                       weight_spec=plan.weight, act_spec=plan.act, rank=plan.rank, smooth=plan.smooth,
                       **factory)
