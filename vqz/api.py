"""The one-call entry points: vqz.quantize and vqz.summary."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .algorithms.adaround import capture_block_io, reconstruct_blocks
from .algorithms.build import quantize_layer
from .algorithms.quartdepth import compensate_layer
from .algorithms.repq import channel_balance, fold_into_layernorm
from .calib import as_forward_loop, observe_layers
from .calib.pipeline import is_pipeline
from .calib.stats import collect_input_stats
from .config import (FAMILY_DESCRIPTIONS, FAMILY_PRESETS, QuantConfig, preset_family,
                     resolve_config)
from .nn.timestep import (attach_timestep_state, bucket_edges, detach_timestep_state,
                          use_timestep_state)
from .guard import guard_dtype
from .patch import Plan, Transaction, architecture_fingerprint, module_paths, plan_layers
from .nn import attention_wrapper
from .pipelines import adapter_for

STATE_ATTR = "_vqz_state"


@dataclass
class QuantState:
    """What vqz.quantize did to a model; kept on the quantized module for summary/save."""

    config: QuantConfig
    plan: Plan
    fingerprint: str  # of the full-precision architecture
    architecture: str  # its class name
    requested: str | None = None  # the preset name asked for, when the model's family renamed it


def _requested(config, cfg: QuantConfig) -> str | None:
    return config if isinstance(config, str) and config != cfg.name else None


def resolve_target(obj) -> nn.Module:
    """The module to quantize: `obj` itself, or a diffusers pipeline's denoiser."""
    if isinstance(obj, nn.Module):
        return obj
    if is_pipeline(obj):
        return obj.transformer if isinstance(getattr(obj, "transformer", None), nn.Module) else obj.unet
    if hasattr(obj, "components"):
        raise TypeError(f"the pipeline {type(obj).__name__} has no .transformer or .unet to quantize")
    raise TypeError(f"vqz needs a torch.nn.Module or a diffusers pipeline, got {type(obj).__name__}")


def quantize(obj, config="w4a4-svd", *, calib=None, **overrides):
    """Quantize `obj` in place and return it.

    obj: an nn.Module or a diffusers pipeline (its denoiser is quantized). config: a preset name
    (`vqz.presets()`), a QuantConfig or its dict; `overrides` change its fields (rank=16,
    group_size=128, exclude=["*proj_out*"]). calib: None, an iterable of model inputs (tensor,
    tuple of args or dict of kwargs per batch), or a callable forward_loop(obj).
    If anything fails, `obj` is left exactly as it was.
    """
    target = resolve_target(obj)
    adapter = adapter_for(target)
    cfg = resolve_config(config, adapter.family, **overrides)
    _check_family(cfg, adapter, target)
    if getattr(target, STATE_ATTR, None) is not None:
        raise ValueError("this model is already quantized; quantize a fresh copy of the "
                         "full-precision model")
    splits = adapter.splits(target) if cfg.split_shortcut else {}
    plan = plan_layers(target, cfg, adapter.default_rules, splits,
                       rank_is_explicit="rank" in overrides, is_attention=adapter.attention)
    if not plan.layers:
        raise ValueError(f"no layer of {type(target).__name__} was selected for quantization "
                         f"(supported: Linear, Conv2d, timm Attention); check the config's rules and exclude")
    repq = _repq_pairs(target, cfg, adapter, plan)
    compensated = [p.name for p in plan.layers if cfg.compensate and _plain(p)]
    blocks = _reconstruction_blocks(target, cfg, adapter)
    # Layers whose quantization reads their input statistics (smoothing, GPTQ's Hessian, RepQ,
    # QuartDepth's polishing α and compensation).
    needs_stats = [p.name for p in plan.layers if p.smooth or p.polish or p.name in compensated
                   or (cfg.gptq and p.kind == "Linear")]
    needs_stats += [names[0] for names in repq.values() if names[0] not in needs_stats]
    static = any(s is not None and not s.dynamic for p in plan.layers for s in (p.act, p.probs))
    if (needs_stats or static) and calib is None:
        why = "static activation scales" if static else "smoothing or GPTQ"
        raise ValueError(f"config {cfg.name!r} uses {why} and needs calibration data: pass "
                         f"calib= (model inputs or a forward_loop callable), or use a preset with "
                         f"dynamic activations such as 'w8a8' or 'w4a4'")
    bucketed = any(p.buckets > 1 for p in plan.layers)
    passes = bool(needs_stats) + static + (bucketed and not needs_stats) + bool(blocks)
    loop = None if calib is None else as_forward_loop(calib, obj, target, passes=passes)
    state = QuantState(cfg, plan, architecture_fingerprint(target), type(target).__name__,
                       _requested(config, cfg))
    tx = Transaction(target)
    try:
        target.eval()  # calibration sees inference behaviour; restore_modes puts the flags back
        if bucketed:
            timesteps = attach_timestep_state(target)
            tx.undo.append(lambda: detach_timestep_state(target))
            timesteps.history = []
        stats = _input_stats(target, plan, needs_stats, loop) if needs_stats else {}
        block_io = capture_block_io(target, blocks, loop) if blocks else {}
        _reparameterize(target, repq, plan, stats, tx)
        if bucketed and not needs_stats:
            with torch.no_grad():
                loop()  # only to learn the calibration timesteps
        paths = module_paths(target)
        built, weights = {}, {}
        for layer_plan in tqdm(plan.layers, desc="vqz quantize", unit="layer", leave=False):
            original = target.get_submodule(layer_plan.name)
            new = quantize_layer(original, layer_plan, cfg, stats.get(layer_plan.name))
            if _plain(layer_plan):
                weights[layer_plan.name] = original.weight  # originals stay untouched
            for path in paths[id(original)]:
                tx.swap(path, new)
            built[layer_plan.name] = new
        if bucketed:
            edges = bucket_edges(timesteps.history, cfg.timestep_buckets)
            timesteps.history = None
            use_timestep_state(built.values(), timesteps, edges)
        if static:
            observe_layers(built, loop)
        for name in tqdm(compensated, desc="vqz compensate", unit="layer", leave=False,
                         disable=not compensated):
            weights[name] = compensate_layer(built[name], weights[name], stats.pop(name).sample)
        stats.clear()
        reconstruct_blocks(target, block_io, built, weights, cfg.reconstruct)
        tx.restore_modes()
        setattr(target, STATE_ATTR, state)
        guard_dtype(target)
    except BaseException:
        tx.rollback()
        raise
    return obj


def _input_stats(target, plan, names: list[str], loop) -> dict:
    """collect_input_stats for `names`; a layer that its attention reads through `.weight` (EVA,
    BEiT qkv) is never called, so its input is observed where it enters the attention module."""
    source = {}
    for p in plan.layers:
        if p.kind == "Attention":
            module = target.get_submodule(p.name)
            for child in attention_wrapper(module).weight_read_children(module):
                source[f"{p.name}.{child}"] = p.name
    stats = collect_input_stats(target, sorted({source.get(n, n) for n in names}), loop)
    return {n: stats[source.get(n, n)] for n in names}


def _plain(p) -> bool:
    """A Linear layer whose weight is rounded as is (no smoothing or low-rank branch) and whose
    activations are quantized: what QuartDepth's compensation and reconstruction refit."""
    return p.kind == "Linear" and p.weight is not None and p.act is not None and not p.smooth \
        and not p.rank


def _reconstruction_blocks(target, cfg: QuantConfig, adapter) -> list[str]:
    if not cfg.reconstruct:
        return []
    blocks = adapter.blocks(target)
    if not blocks:
        raise ValueError(f"reconstruct={cfg.reconstruct} learns rounding per block, but vqz knows "
                         f"no blocks of {type(target).__name__} (adapter {adapter.name!r}); use "
                         f"reconstruct=0, or a model whose adapter names its blocks (Depth "
                         f"Anything, DPT)")
    return blocks


def _check_family(cfg: QuantConfig, adapter, target) -> None:
    """A recipe made for one model family (vit-*, depth-*) fits no other: refused before any change."""
    family = preset_family(cfg.name)
    if family is None or family == adapter.family:
        return
    generic = {v: k for k, v in FAMILY_PRESETS[family].items()}.get(cfg.name)
    own = FAMILY_PRESETS.get(adapter.family, {})
    if adapter.family is None:
        what = "is not one of them"
    else:
        what = f"is one of the {FAMILY_DESCRIPTIONS[adapter.family]}"
    if generic in own:
        fix = f"use {own[generic]!r} (or just {generic!r}, which resolves to it for this model)"
    else:
        fix = ("use a generic preset such as 'w8a8' or 'w8a8-static'" if not own else
               f"use one of {sorted(own.values())} (or the generic names {sorted(own)})")
    raise ValueError(f"preset {cfg.name!r} is a recipe for {FAMILY_DESCRIPTIONS[family]}, but "
                     f"{type(target).__name__} {what}; {fix}")


def _repq_pairs(target, cfg: QuantConfig, adapter, plan) -> dict:
    """The adapter's LayerNorm -> consumers pairs whose consumers all have static activations."""
    if not cfg.repq:
        return {}
    static = {p.name for p in plan.layers if p.kind == "Linear" and p.act is not None
              and not p.act.dynamic}
    return {norm: names for norm, names in adapter.norm_consumers(target).items()
            if names and all(n in static for n in names)}


def _reparameterize(target, pairs: dict, plan, stats: dict, tx: Transaction) -> None:
    """RepQ: balance each LayerNorm's output channels for the per-tensor quantizers of its
    consumers, in place (undone by the transaction on failure)."""
    bits = {p.name: p.act.fmt.bits for p in plan.layers if p.act is not None}
    for norm_name, names in pairs.items():
        norm = target.get_submodule(norm_name)
        consumers = [target.get_submodule(n) for n in names]
        observed = stats[names[0]]
        divisor, shift = channel_balance(observed.min, observed.max, bits[names[0]])
        saved = [(t, t.detach().clone()) for m in (norm, *consumers) for t in (m.weight, m.bias)]
        tx.undo.append(lambda saved=saved: [t.data.copy_(v) for t, v in saved])
        fold_into_layernorm(norm, consumers, divisor, shift)
        for name in names:
            if name in stats:
                stats[name].divide_and_shift(divisor, shift)


def quant_state(obj) -> QuantState:
    state = getattr(resolve_target(obj), STATE_ATTR, None)
    if state is None:
        raise ValueError("this model is not quantized by vqz; call vqz.quantize (or vqz.load) first")
    return state


class Summary(list):
    """Rows of vqz.summary, printed as a table under the recipe's name (`recipe`)."""

    COLUMNS = ("name", "type", "weight", "act", "group", "rank", "calib", "status")
    recipe = ""

    def __str__(self) -> str:
        cells = [self.COLUMNS] + [tuple(str(row[c]) for c in self.COLUMNS) for row in self]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.COLUMNS))]
        table = "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells)
        return f"recipe: {self.recipe}\n{table}" if self.recipe else table


def summary(obj) -> Summary:
    """One row per layer with weights: quantized ones with their formats, group, rank and the
    calibration statistic of their activations; full-precision ones with the reason."""
    state = quant_state(obj)
    rows = Summary()
    rows.recipe = state.config.name + (f" (asked for {state.requested!r}, this model family's recipe "
                                       f"of that name)" if state.requested else "")
    for p in state.plan.layers:
        groups = {s.group_size for s in (p.weight, p.act) if s is not None and s.group_size}
        rows.append({
            "name": p.name, "type": p.kind, "weight": _describe(p.weight), "act": _describe_act(p),
            "group": "/".join(str(g) for g in sorted(groups)) or "-", "rank": p.rank,
            "calib": _calib_column(p), "status": "quantized"})
    for s in state.plan.skipped:
        rows.append({"name": s.name, "type": s.kind, "weight": "-", "act": "-", "group": "-",
                     "rank": 0, "calib": "-", "status": f"full precision: {s.reason}"})
    return rows


def _describe(spec) -> str:
    if spec is None:
        return "-"
    side = "" if spec.symmetric else " asym"
    return f"{spec.format} per-{spec.granularity}{side}"


def _describe_act(plan) -> str:
    if plan.probs is None:
        return _describe(plan.act) + (", rotated" if plan.rotate else "")
    return f"qkv {_describe(plan.act)}, softmax {_describe(plan.probs)}"


def _statistic(spec) -> str:
    if spec is None:
        return "-"
    if spec.dynamic:
        return "dynamic"
    return f"percentile {spec.percentile}" if spec.observer == "percentile" else spec.observer


def _calib_column(plan) -> str:
    stat = _statistic(plan.act)
    return f"{stat}, {plan.buckets} timestep ranges" if plan.buckets > 1 else stat
