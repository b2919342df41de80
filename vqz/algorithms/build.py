"""Turning one full-precision layer into its quantized replacement, following its LayerPlan."""
from __future__ import annotations

import torch
from torch import nn

from ..config import QuantConfig
from ..nn import QuantConv2d, QuantLinear, QuantModule, attention_wrapper
from ..nn.rotation import quantizer_input
from ..nn.polish import PolishedQuantLinear
from ..patch import LayerPlan
from .gptq import gptq_quantize, input_hessian
from .quartdepth import polish_alpha
from .svd import svd_quantize


def quantize_layer(module: nn.Module, plan: LayerPlan, cfg: QuantConfig, stats=None) -> QuantModule:
    """Round-to-nearest with the plan's observers; for Linear layers with smoothing or a low-rank
    branch, SVDQuant first (`stats`: the layer's calib.stats.InputStats, needed for smoothing and
    GPTQ). With `cfg.gptq`, a Linear weight (with SVDQuant, its residual R) is rounded by GPTQ
    with the Hessian of the layer's calibration input rows (smoothed: x / λ); Conv2d layers ignore
    `cfg.gptq` and round to nearest. Attention wraps the module's own children (no weights of its
    own); its qkv/proj Linear layers have plans of their own."""
    if plan.kind == "Attention":
        return attention_wrapper(module)(module, plan.act, plan.probs, plan.buckets)
    if plan.kind == "Conv2d":
        return QuantConv2d.from_float(module, plan.weight, plan.act, plan.splits, plan.buckets)
    gptq = cfg.gptq and plan.weight is not None
    if (gptq or plan.polish) and stats is None:
        raise ValueError(f"GPTQ or polishing on layer {plan.name!r} needs calibration statistics")
    linear_cls = PolishedQuantLinear if plan.polish else QuantLinear
    if not (plan.smooth or plan.rank):
        layer = linear_cls.from_float(module, plan.weight, plan.act, act_buckets=plan.buckets,
                                      rotate=plan.rotate,
                                      round_weight=_gptq(stats, None, plan) if gptq else None)
        return _set_alpha(layer, stats, plan)
    if plan.smooth and stats is None:
        raise ValueError(f"smoothing layer {plan.name!r} needs calibration statistics")
    result = svd_quantize(
        module.weight, rank=plan.rank, weight_spec=plan.weight, act_spec=plan.act,
        x_absmax=stats.absmax if plan.smooth else None,
        x_sample=stats.sample if plan.smooth else None, alpha=cfg.alpha, iters=cfg.svd_iters)
    layer = linear_cls.from_float(module, plan.weight, plan.act, smooth=result.smooth,
                                  lowrank=result.lowrank, act_buckets=plan.buckets,
                                  rotate=plan.rotate,
                                  round_weight=_gptq(stats, result.smooth, plan) if gptq else None)
    return _set_alpha(layer, stats, plan)


def _set_alpha(layer: QuantLinear, stats, plan: LayerPlan) -> QuantLinear:
    """A polished layer's α from its calibration inputs (as the quantizer sees them: smoothed)."""
    if plan.polish:
        rows = stats.sample.to(layer.act_quantizer.alpha.device)
        layer.act_quantizer.alpha.copy_(polish_alpha(layer.smoothed(rows)))
    return layer


def _gptq(stats, smooth, plan: LayerPlan):
    """R [N, K] -> GPTQ codes and scales, for the inputs `stats.sample` [S, K] as the layer's
    quantizer sees them (divided by λ, rotated if the layer rotates)."""
    def round_weight(r):
        x = stats.sample.to(r.device, torch.float32)
        return gptq_quantize(r, input_hessian(quantizer_input(x, smooth, plan.rotate)), plan.weight)
    return round_weight


def empty_layer(module: nn.Module, plan: LayerPlan) -> QuantModule:
    """The quantized layer `plan` describes, with uninitialised tensors on `module`'s device (meta
    included), ready to receive a checkpoint's state."""
    if plan.kind == "Attention":
        return attention_wrapper(module)(module, plan.act, plan.probs, plan.buckets)
    w = module.weight
    factory = {"device": w.device, "dtype": w.dtype}
    if plan.kind == "Conv2d":
        return QuantConv2d(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                           module.padding, module.dilation, module.groups, module.bias is not None,
                           module.padding_mode, weight_spec=plan.weight, act_spec=plan.act,
                           splits=plan.splits, act_buckets=plan.buckets, **factory)
    linear_cls = PolishedQuantLinear if plan.polish else QuantLinear
    return linear_cls(module.in_features, module.out_features, module.bias is not None,
                      weight_spec=plan.weight, act_spec=plan.act, rank=plan.rank, smooth=plan.smooth,
                      act_buckets=plan.buckets, rotate=plan.rotate, **factory)
