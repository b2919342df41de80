"""Which layers of a model get quantized, and swapping them in and out as one transaction."""
from __future__ import annotations

import hashlib
import json
from fnmatch import fnmatchcase
from dataclasses import asdict, dataclass, field
from typing import Callable

from torch import nn

from .config import LayerRule, QuantConfig, QuantSpec
from .nn import QuantModule, attention_wrapper
from .nn.rotation import rotatable


@dataclass(frozen=True)
class LayerPlan:
    """The recipe for one layer, as decided from the config and its rules."""

    name: str
    kind: str  # "Linear", "Conv2d" or "Attention" (act: its q/k/v spec, probs: its softmax spec)
    weight: QuantSpec | None
    act: QuantSpec | None
    rank: int = 0
    smooth: bool = False
    splits: tuple = ()
    buckets: int = 0  # timestep ranges of the static activation scales (0: one range)
    probs: QuantSpec | None = None
    polish: bool = False  # activations quantized in the polished (log) domain (QuartDepth)
    rotate: bool = False  # input rotated by a block Hadamard matrix (vqz/nn/rotation.py)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["splits"] = list(self.splits)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> LayerPlan:
        d = dict(d)
        for key in ("weight", "act", "probs"):
            d[key] = QuantSpec.from_dict(d[key]) if d.get(key) is not None else None
        d["splits"] = tuple(d["splits"])
        return cls(**d)


@dataclass(frozen=True)
class Skipped:
    """A layer with weights left in full precision, and why."""

    name: str
    kind: str
    reason: str


@dataclass
class Plan:
    layers: list[LayerPlan] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)


def layer_kind(module: nn.Module) -> str | None:
    """"Linear" or "Conv2d" for layers QuantLinear/QuantConv2d reproduce exactly, else None.

    Subclasses that override forward (timm's Conv2dSame, say) and nn.MultiheadAttention's
    out_proj (read through its weight by the attention function) are not replaceable.
    """
    if isinstance(module, nn.modules.linear.NonDynamicallyQuantizableLinear):
        return None
    if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
        return "Linear"
    if isinstance(module, nn.Conv2d) and type(module).forward is nn.Conv2d.forward \
            and type(module)._conv_forward is nn.Conv2d._conv_forward:
        return "Conv2d"
    return None


def _has_matrix_weight(module: nn.Module) -> bool:
    return any(p.dim() >= 2 for p in module.parameters(recurse=False))


def plan_layers(model: nn.Module, cfg: QuantConfig, default_rules: tuple = (),
                splits: dict | None = None, rank_is_explicit: bool = False,
                is_attention: Callable[[nn.Module], bool] | None = None) -> Plan:
    """Decide each layer's recipe. `default_rules` (a family adapter's) come before the config's
    own rules, so the user's rules override them; `cfg.exclude` always wins. `splits` maps Conv2d
    names to their input-channel split points. With `cfg.attn` set, the modules `is_attention`
    (the family adapter's) recognises get an "Attention" plan; their Linear children keep their own.

    A low-rank branch needs rank < min(N, K) to leave anything to quantize. A rank the user asked
    for (`rank_is_explicit`, or a rule's rank) that exceeds min(N, K) is an error; a preset's
    default rank on a layer that small just gives it no branch."""
    splits = splits or {}
    rules = tuple(default_rules) + cfg.rules
    plan, too_big = Plan(), []
    unwrapped_reads = {}  # Linear children read through .weight by an attention left unwrapped
    superseded = superseded_projections(model)
    for name, module in model.named_modules():
        if isinstance(module, QuantModule):
            raise ValueError(f"layer {name!r} is already quantized; quantize a fresh copy of the "
                             f"full-precision model")
        if name in unwrapped_reads or name in superseded:
            reason = unwrapped_reads.get(name) or superseded[name]
            plan.skipped.append(Skipped(name, type(module).__name__, reason))
            continue
        claimed = is_attention is not None and is_attention(module)
        kind = "Attention" if claimed and cfg.attn is not None else layer_kind(module)
        if kind is None:
            if _has_matrix_weight(module) and not _inside_planned(name, plan):
                plan.skipped.append(Skipped(name, type(module).__name__, "unsupported layer type"))
            _note_weight_reads(name, module, claimed, unwrapped_reads)
            continue
        recipe = _apply_rules(name, kind, cfg, rules)
        if isinstance(recipe, str):
            plan.skipped.append(Skipped(name, kind, recipe))
            _note_weight_reads(name, module, claimed, unwrapped_reads)
            continue
        explicit = recipe.pop("rank_from_rule") or rank_is_explicit
        if recipe.get("rank"):
            limit = min(module.in_features, module.out_features)
            if recipe["rank"] > limit and explicit:
                too_big.append((name, recipe["rank"], limit))
            elif recipe["rank"] >= limit:
                recipe["rank"] = 0
        if recipe.get("rotate") and not rotatable(module.in_features):
            recipe["rotate"] = False
        plan.layers.append(LayerPlan(name, kind, splits=tuple(splits.get(name, ())), **recipe))
    if too_big:
        raise ValueError(f"low-rank branch rank larger than the layer allows (name, rank, "
                         f"min(N, K)): {too_big[:5]}; pass a smaller rank= or exclude these layers")
    return plan


# diffusers' fuse_projections() adds one projection per group of separate ones sharing an input
# and keeps the separate ones, which the attention then no longer calls.
FUSED_PROJECTIONS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
                     "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def superseded_projections(model: nn.Module) -> dict[str, str]:
    """{name: reason} of the projections that a diffusers attention with fused projections
    (`fuse_qkv_projections()`) no longer calls: they stay in full precision, unquantized."""
    found = {}
    for name, module in model.named_modules():
        if not getattr(module, "fused_projections", False):
            continue
        prefix = f"{name}." if name else ""
        for fused, parts in FUSED_PROJECTIONS.items():
            if isinstance(getattr(module, fused, None), nn.Module):
                for part in parts:
                    found[prefix + part] = (f"superseded by the fused {prefix}{fused} "
                                            f"(fuse_qkv_projections); not called, not quantized")
    return found


def _note_weight_reads(name: str, module: nn.Module, claimed: bool, reads: dict) -> None:
    """An attention module left in full precision keeps its own forward; children it reads
    through `.weight` must then stay nn.Linear."""
    if not claimed:
        return
    for child in attention_wrapper(module).weight_read_children(module):
        reads[f"{name}.{child}"] = (f"{type(module).__name__} reads this layer's weight directly "
                                    f"(F.linear with its q/v biases); it is quantized only together "
                                    f"with the attention (a config with attn=, such as 'vit-w8a8')")


def _inside_planned(name: str, plan: Plan) -> bool:
    # Parameters of a skipped parent are reported once, at the parent.
    return any(name.startswith(s.name + ".") for s in plan.skipped if s.name)


def _apply_rules(name: str, kind: str, cfg: QuantConfig, rules: tuple[LayerRule, ...]):
    """The layer's recipe as a dict of LayerPlan fields, or the reason it stays in full precision."""
    weight, act, rank, skip, rank_from_rule = cfg.weight, cfg.act, cfg.rank, None, False
    smooth = cfg.smooth
    for rule in rules:
        if not rule.matches(name, kind):
            continue
        if rule.skip is not None:
            skip = rule.skip
        if rule.smooth is not None:
            smooth = rule.smooth
        weight = rule.weight or weight
        act = None if rule.no_act else (rule.act or act)
        if rule.rank is not None:
            rank, rank_from_rule = rule.rank, True
    if skip:
        return "excluded by a rule"
    if any(fnmatchcase(name, pattern) for pattern in cfg.exclude):
        return "excluded"
    if kind == "Attention":  # rules only select or skip attention; its specs come from cfg.attn
        return {"weight": None, "act": cfg.attn.operands, "probs": cfg.attn.probs,
                "buckets": cfg.timestep_buckets, "rank_from_rule": False}
    learned = act is not None and (not act.dynamic or act.learnable)  # static or a learned clip
    buckets = cfg.timestep_buckets if learned else 0
    if kind == "Conv2d":
        if weight is None:
            return "activation-only configs quantize Linear layers only"
        return {"weight": weight, "act": act, "buckets": buckets, "rank_from_rule": False}
    return {"weight": weight, "act": act, "rank": rank, "smooth": smooth, "buckets": buckets,
            "polish": cfg.polish and act is not None, "rank_from_rule": rank_from_rule,
            "rotate": cfg.rotate and act is not None and act.dynamic}


def module_paths(model: nn.Module) -> dict[int, list[str]]:
    """All names under which each module is reachable (a shared module has several)."""
    paths: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(module), []).append(name)
    return paths


def architecture_fingerprint(model: nn.Module) -> str:
    """A hash of the module tree (names, classes, tensor shapes): two models with the same
    fingerprint accept each other's checkpoints."""
    items = [(n, type(m).__name__) for n, m in model.named_modules()]
    items += [(n, list(t.shape)) for n, t in model.state_dict(keep_vars=True).items()]
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


class Transaction:
    """Swaps submodules and remembers how to put everything back.

    Originals are never modified, so a rollback restores the model exactly. Training flags are
    restored on commit too, since calibration runs the model in eval mode.
    """

    def __init__(self, root: nn.Module):
        self.root = root
        self.swaps: list[tuple[str, nn.Module]] = []
        self.undo: list = []  # callables that take back other changes, run last to first
        self.training = {m: m.training for m in root.modules()}

    def swap(self, name: str, new: nn.Module) -> None:
        parent_name, _, attr = name.rpartition(".")
        parent = self.root.get_submodule(parent_name)
        self.swaps.append((name, getattr(parent, attr)))
        setattr(parent, attr, new)

    def rollback(self) -> None:
        for name, old in reversed(self.swaps):
            parent_name, _, attr = name.rpartition(".")
            setattr(self.root.get_submodule(parent_name), attr, old)
        self.swaps.clear()
        for undo in reversed(self.undo):
            undo()
        self.undo.clear()
        self.restore_modes()

    def restore_modes(self) -> None:
        """Training flags as they were; a swapped-in module takes the flag of the one it replaced."""
        for module, training in self.training.items():
            module.training = training
        for name, old in self.swaps:
            self.root.get_submodule(name).train(old.training)
