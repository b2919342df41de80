"""Putting QAT wrappers into a model, stepping their rank schedule, and taking them out again.
Swaps go through the caller's Transaction, so a failed run can be rolled back whole."""
from __future__ import annotations

from torch import nn

from ..nn.linear import QuantLinear
from ..nn.timestep import (STATE_NAME, attach_timestep_state, detach_timestep_state,
                           use_timestep_state)
from ..patch import Plan, Transaction, module_paths
from .linear import QATLinear
from .schedule import RankSchedule


def wrap(target: nn.Module, plan: Plan, edges, smooth: dict, lowrank: dict,
         tx: Transaction) -> dict[str, QATLinear]:
    """Replace every Linear layer of `plan` by a QATLinear, smoothed by `smooth` {name: λ [K]}
    where given, keeping the branch `lowrank` {name: (L1, L2)} where given (else its branch decays).
    Timestep ranges (`edges`, see bucket_edges) are needed when the plan's layers have act
    buckets."""
    paths = module_paths(target)
    layers = {}
    for p in plan.layers:
        original = target.get_submodule(p.name)
        new = QATLinear(original, p.weight, p.act, p.rank, p.buckets, smooth.get(p.name), p.rotate,
                        lowrank.get(p.name))
        for path in paths[id(original)]:
            tx.swap(path, new)
        layers[p.name] = new
    if any(p.buckets > 1 for p in plan.layers):
        if edges is None:
            raise ValueError("per-timestep clip ratios need the training timesteps' ranges")
        use_timestep_state(layers.values(), attach_timestep_state(target), edges)
        tx.undo.append(lambda: detach_timestep_state(target))
    return layers


def qat_layers(model: nn.Module) -> dict[str, QATLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, QATLinear)}


def apply_schedule(layers: list[QATLinear], schedule: RankSchedule, step: int) -> bool:
    """Set each wrapper's decaying branch for `step`: re-factorised by SVD when a new decay phase
    began since it was last set (so resuming at any step works), faded as the schedule says. Kept
    branches are left alone. Returns whether the factors changed (their optimizer moments then no
    longer apply)."""
    kept, fading, u = schedule.state(step)
    phase = schedule.phase(step)
    key = -1 if step < schedule.start else (schedule.phases if phase is None else phase)
    branched = [layer for layer in layers if layer.rank and not layer.keep_branch]
    # the layers go through the phases together: one read of the phase (a device sync) per step
    changed = bool(branched) and int(branched[0].phase) != key
    for layer in branched:
        if changed:
            layer.refactor(kept + fading)
            layer.phase.fill_(key)
        layer.set_fade(kept, fading, u)
    return changed


def unwrap(target: nn.Module, tx: Transaction) -> dict[str, QuantLinear]:
    """Replace every QATLinear by its plain quantized layer; the timestep state, if any, stays and
    now serves the exported layers."""
    paths = module_paths(target)
    exported = {}
    for name, layer in qat_layers(target).items():
        new = layer.to_quant_linear()
        for path in paths[id(layer)]:
            tx.swap(path, new)
        exported[name] = new
    state = getattr(target, STATE_NAME, None)
    if state is not None:
        use_timestep_state(exported.values(), state)
    return exported
