"""LoRA adapters on vqz-quantized models, applied without re-quantizing.

    import vqz.lora
    vqz.lora.load_lora(pipe, "style.safetensors", adapter_name="style", scale=0.8)
    vqz.lora.set_lora_scale(pipe, "style", 0.5)
    vqz.lora.remove_lora(pipe, "style")

A LoRA adds ΔW = s B A to a Linear weight W [N, K] (A [r, K], B [N, r]; s = alpha / r times the
strength `scale`). QuantLinear computes y = Q(x/λ) Q(R)ᵀ + ((x/λ) L1) L2 + b, and x = (x/λ) ⊙ λ,
so the LoRA is exactly more columns of its 16-bit branch: L1 ← [L1 | diag(λ) Aᵀ], L2 ← [L2 ; s Bᵀ].
The quantized weight is never touched, and the fused kernels run the LoRA inside the same down/up
projection as the SVD branch.

Choices:
- Each adapter is its own segment of the branch, zero-padded to a multiple of RANK_MULTIPLE
  columns (exact zeros: the function is unchanged), so a branch whose rank suited the kernels still
  does. On layers the fused int8 kernels run, a branch wider than MAX_RANK is refused: it would
  silently move the layer to the slow reference path. Other layers take any rank.
- Linear layers the config left in full precision take a LoRA too: they are wrapped in an
  unquantized QuantLinear (weight_spec=None) sharing their weight and bias, and put back when their
  last adapter is removed. Layers vqz could not replace either (subclasses with their own forward,
  layers an attention reads through `.weight`), convolutions and embeddings are refused.
- vqz.save would store the branch as it is, LoRA columns included, and vqz.load, which rebuilds
  each layer at the rank of its quantization plan, would refuse that checkpoint (wrong shapes,
  unexpected keys). `check_saveable` raises before that happens: save the model without adapters
  and load the LoRA files again after vqz.load.
"""
from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .api import STATE_ATTR, resolve_target
from .kernels.runtime import MAX_RANK, kernel_kind, padded_rank, prepare, prepare_branch
from .nn import QuantLinear, attention_wrapper
from .nn.rotation import hadamard_rotate
from .lora_files import DORA, group_factors, read_lora
from .patch import Transaction, layer_kind, module_paths

LORA_ATTR = "_vqz_lora"
# prefixes of the denoiser's module names in pipeline-level and PEFT-wrapped files
_PREFIXES = ("base_model.model.", "transformer.", "unet.", "diffusion_model.")
# kohya writes module names with "_" for "."
_FLAT_PREFIXES = ("lora_unet_", "lora_transformer_")
@dataclass(frozen=True)
class LoraInfo:
    """One loaded adapter: its strength and the LoRA rank per adapted layer (before padding)."""

    scale: float
    ranks: dict[str, int]


@dataclass
class _Segment:
    """One adapter's columns in one layer's branch."""

    width: int  # the LoRA's rank plus zero padding
    up: torch.Tensor  # B [N, r] as loaded, to rewrite the up rows at another strength
    factor: float  # alpha / r (alpha / √r for rsLoRA)


@dataclass
class _Adapter:
    scale: float
    layers: dict[str, _Segment] = field(default_factory=dict)


@dataclass
class _LoraState:
    """Kept on the model under LORA_ATTR while any adapter is loaded."""

    adapters: dict[str, _Adapter] = field(default_factory=dict)  # in load order
    wrapped: dict[str, nn.Module] = field(default_factory=dict)  # full-precision originals by name


@dataclass
class _Factors:
    """A validated LoRA for one layer: A [r, K], B [N, r], alpha / r."""

    down: torch.Tensor
    up: torch.Tensor
    factor: float

    @property
    def width(self) -> int:
        return padded_rank(self.down.shape[0])


# ---------------------------------------------------------------------------------------- public

@torch.no_grad()
def load_lora(model_or_pipe, source, adapter_name: str = "default", scale: float = 1.0):
    """Add the LoRA `source` to the quantized model (or a pipeline's denoiser) as `adapter_name`
    with strength `scale`; returns `model_or_pipe`.

    source: a .safetensors (or PyTorch .bin) file, a folder holding diffusers'
    pytorch_lora_weights.safetensors or PEFT's adapter_model.safetensors (+ adapter_config.json),
    or a state dict. Keys: `<module>.lora_A.weight` / `lora_B.weight` (diffusers, PEFT; optionally
    `.lora_A.<adapter>.weight`), `<module>.lora.down.weight` / `lora.up.weight`, or kohya's
    `<module>.lora_down.weight` / `lora_up.weight` with `<module>.alpha`; module names as the
    model's, optionally under `transformer.`, `unet.` or `base_model.model.`, or flattened after
    `lora_unet_` / `lora_transformer_`. A [r, K], B [N, r], any float dtype. Each layer's factor is
    alpha / r with alpha from its `.alpha` key, else PEFT's alpha_pattern or lora_alpha
    (adapter_config.json or diffusers' metadata), else r. Everything is checked before any layer
    changes: on an error the model is as it was.
    """
    target = resolve_target(model_or_pipe)
    if getattr(target, STATE_ATTR, None) is None:
        raise ValueError("vqz.lora adds LoRA to models quantized by vqz, and this one is not: call "
                         "vqz.quantize (or vqz.load) first, or use diffusers' load_lora_weights for "
                         "a full-precision model")
    state = getattr(target, LORA_ATTR, None) or _LoraState()
    if not isinstance(adapter_name, str) or not adapter_name:
        raise ValueError(f"adapter_name must be a non-empty string, got {adapter_name!r}")
    if adapter_name in state.adapters:
        raise ValueError(f"a LoRA adapter named {adapter_name!r} is already loaded; pick another "
                         f"adapter_name, or vqz.lora.remove_lora(model, {adapter_name!r}) first")
    strength = _check_scale(scale)
    tensors, config = read_lora(source)
    if config.get("use_dora"):
        raise ValueError(DORA)
    loras = _validate(target, state, group_factors(tensors), config)
    _apply(target, state, adapter_name, strength, loras)
    return model_or_pipe


@torch.no_grad()
def set_lora_scale(model_or_pipe, adapter_name: str, scale: float) -> None:
    """Change the strength of a loaded adapter (0 switches it off) without reloading it."""
    target = resolve_target(model_or_pipe)
    state = _loaded(target, adapter_name)
    strength = _check_scale(scale)
    adapter = state.adapters[adapter_name]
    for name, segment in adapter.layers.items():
        layer = target.get_submodule(name)
        start = _starts(state, name, layer)[adapter_name]
        layer.lora_up.data[start:start + segment.width] = _up_rows(segment, strength, layer.lora_up)
        _refresh_kernels(layer)
    adapter.scale = strength


@torch.no_grad()
def remove_lora(model_or_pipe, adapter_name: str) -> None:
    """Take an adapter out: every branch it widened is again exactly what it was before."""
    target = resolve_target(model_or_pipe)
    _remove(target, _loaded(target, adapter_name), adapter_name)


def list_loras(model_or_pipe) -> dict[str, LoraInfo]:
    """The loaded adapters in load order ({} when none)."""
    state = getattr(resolve_target(model_or_pipe), LORA_ATTR, None)
    if state is None:
        return {}
    return {name: LoraInfo(a.scale, {layer: s.up.shape[1] for layer, s in a.layers.items()})
            for name, a in state.adapters.items()}


def check_saveable(model_or_pipe) -> None:
    """Raise if the model carries adapters: vqz.load rebuilds each layer with the rank its
    quantization plan gives it, so a checkpoint of the widened branches would not load."""
    names = list(list_loras(model_or_pipe))
    if names:
        raise ValueError(f"the model carries the LoRA adapters {names}, which a vqz checkpoint "
                         f"cannot hold; call vqz.lora.remove_lora(model, name) for each before "
                         f"vqz.save, keep the LoRA files, and load them again after vqz.load")


# ------------------------------------------------------------------------------------ validation

def _validate(target: nn.Module, state: _LoraState, groups: dict, config: dict) -> dict[str, _Factors]:
    """{layer name: its LoRA}, every name, layer type, shape and rank limit checked."""
    names = _resolve(target, list(groups))
    reads = _weight_read_layers(target)
    loras = {}
    for written, name in names.items():
        layer, parts = target.get_submodule(name), groups[written]
        _check_layer(name, layer, reads)
        down, up = (parts[role][1] for role in ("down", "up"))
        _check_shapes(name, layer, down, up)
        lora = _Factors(down, up, _alpha_scale(name, parts, config, down.shape[0]))
        if isinstance(layer, QuantLinear):
            _check_kernel_rank(name, layer, lora)
        loras[name] = lora
    return loras


def _resolve(target: nn.Module, written: list[str]) -> dict[str, str]:
    """{module name as written: its name in `target`}; refuses names that match no module or the
    same module twice."""
    paths = module_paths(target)
    alias = {p: names[0] for names in paths.values() for p in names if p}
    flat: dict[str, str | None] = {}
    for p, name in alias.items():
        key = p.replace(".", "_")
        flat[key] = name if flat.get(key, name) == name else None  # None: ambiguous
    names, unmatched = {}, []
    for w in written:
        name = _lookup(w, alias, flat)
        if name is None:
            unmatched.append(w)
        elif name in names.values():
            other = next(k for k, v in names.items() if v == name)
            raise ValueError(f"{other!r} and {w!r} both name the module {name!r}; pass a state dict "
                             f"with one LoRA per module")
        else:
            names[w] = name
    if unmatched:
        linear = [n for n, m in target.named_modules() if isinstance(m, QuantLinear)][:3]
        hint = ""
        if any(w.startswith(("text_encoder", "lora_te")) for w in unmatched):
            hint = (" Keys for a text encoder: vqz adds LoRA to the quantized denoiser only; apply "
                    "those with diffusers, or drop them from the state dict.")
        raise ValueError(f"{len(unmatched)} of the {len(written)} modules this LoRA adapts match no "
                         f"module of {type(target).__name__}: {unmatched[:5]}; it was made for "
                         f"another architecture, or names modules otherwise (this model's quantized "
                         f"layers are named like {linear}; vqz strips the prefixes {list(_PREFIXES)} "
                         f"and reads kohya's flattened names after {list(_FLAT_PREFIXES)}).{hint}")
    return names


def _lookup(written: str, alias: dict[str, str], flat: dict[str, str | None]) -> str | None:
    name = written
    while name not in alias:
        prefix = next((p for p in _PREFIXES if name.startswith(p)), None)
        if prefix is None:
            break
        name = name[len(prefix):]
    if name in alias:
        return alias[name]
    prefix = next((p for p in _FLAT_PREFIXES if written.startswith(p)), None)
    return flat.get(written[len(prefix):]) if prefix else None


def _weight_read_layers(target: nn.Module) -> set[str]:
    """Linear layers that an attention module left in full precision reads through `.weight`
    instead of calling (timm EVA/BEiT qkv): a wrapper there would be bypassed."""
    return {f"{name}.{child}" if name else child for name, module in target.named_modules()
            if (wrapper := attention_wrapper(module)) is not None
            for child in wrapper.weight_read_children(module)}


def _check_layer(name: str, layer: nn.Module, reads: set[str]) -> None:
    if isinstance(layer, QuantLinear):
        return
    if layer_kind(layer) == "Linear" and name not in reads:
        return
    what = "read through its .weight by its attention module" if name in reads else \
        f"a {type(layer).__name__}"
    raise ValueError(f"the LoRA adapts {name!r}, {what}; vqz adds LoRA to Linear layers only "
                     f"(quantized, or plain nn.Linear left in full precision). Drop its keys from "
                     f"the state dict, or merge the LoRA into the full-precision model and quantize "
                     f"that")


def _check_shapes(name: str, layer: nn.Module, down: torch.Tensor, up: torch.Tensor) -> None:
    n, k = layer.out_features, layer.in_features
    fits = down.dim() == 2 and up.dim() == 2 and down.shape[0] > 0 \
        and down.shape[1] == k and up.shape == (n, down.shape[0])
    if not fits:
        raise ValueError(f"the LoRA for {name!r} has down/A {tuple(down.shape)} and up/B "
                         f"{tuple(up.shape)}, but the layer (in_features={k}, out_features={n}) "
                         f"needs [r, {k}] and [{n}, r]; the LoRA was made for another model or "
                         f"another configuration of it")
    if not (down.is_floating_point() and up.is_floating_point()):
        raise ValueError(f"the LoRA factors of {name!r} are {down.dtype}/{up.dtype}, not floats")


def _alpha_scale(name: str, parts: dict, config: dict, rank: int) -> float:
    """alpha / r (alpha / √r for rsLoRA). alpha: the module's `.alpha` key, else PEFT's
    alpha_pattern or lora_alpha, else r (a scale of 1, as diffusers takes files without alpha)."""
    if "alpha" in parts:
        alpha = float(parts["alpha"][1])
    else:
        patterns = config.get("alpha_pattern") or {}
        pattern = next((p for p in patterns if re.fullmatch(rf"(.*\.)?{p}", name)), None)
        alpha = float(patterns[pattern] if pattern is not None else config.get("lora_alpha", rank))
    return alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _check_kernel_rank(name: str, layer: QuantLinear, lora: _Factors) -> None:
    """The fused int8 kernels take a branch of at most MAX_RANK: a wider one would leave them."""
    total = layer.rank + lora.width
    if kernel_kind(layer) == "int8" and total > MAX_RANK:
        raise ValueError(f"{name!r}: this LoRA (rank {lora.down.shape[0]}, {lora.width} columns "
                         f"padded) would widen its low-rank branch from rank {layer.rank} to "
                         f"{total}, above the {MAX_RANK} the fused kernels take; use a LoRA of lower "
                         f"rank, or remove another adapter first")


def _check_scale(scale) -> float:
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def _loaded(target: nn.Module, adapter_name: str) -> _LoraState:
    state = getattr(target, LORA_ATTR, None)
    loaded = [] if state is None else list(state.adapters)
    if adapter_name not in loaded:
        raise ValueError(f"no LoRA adapter named {adapter_name!r} is loaded (loaded: {loaded}); "
                         f"vqz.lora.list_loras(model) lists them")
    return state


# -------------------------------------------------------------------------------------- branches

def _apply(target: nn.Module, state: _LoraState, adapter_name: str, strength: float,
           loras: dict[str, _Factors]) -> None:
    """Append every layer's segment; on a failure half way, take back what was done."""
    adapter = state.adapters[adapter_name] = _Adapter(strength)
    setattr(target, LORA_ATTR, state)
    dtype = next((p.dtype for p in target.parameters() if p.is_floating_point()),
                 torch.get_default_dtype())
    paths = module_paths(target)
    try:
        for name, lora in loras.items():
            layer = target.get_submodule(name)
            if not isinstance(layer, QuantLinear):
                layer = _wrap(target, state, name, layer, paths[id(layer)])
            segment = _Segment(lora.width, lora.up.detach().clone(), lora.factor)
            like = _branch_like(layer, dtype)
            down, up = _down_columns(layer, lora.down, lora.width, like), _up_rows(segment, strength, like)
            if layer.lora_down is not None:
                down = torch.cat([layer.lora_down.detach(), down], 1)
                up = torch.cat([layer.lora_up.detach(), up], 0)
            _set_branch(layer, down, up)
            adapter.layers[name] = segment
    except BaseException:
        _remove(target, state, adapter_name)
        raise


def _remove(target: nn.Module, state: _LoraState, adapter_name: str) -> None:
    adapter = state.adapters[adapter_name]
    for name in list(adapter.layers):
        layer = target.get_submodule(name)
        start = _starts(state, name, layer)[adapter_name]
        end = start + adapter.layers[name].width
        down, up = layer.lora_down.detach(), layer.lora_up.detach()
        _set_branch(layer, torch.cat([down[:, :start], down[:, end:]], 1),
                    torch.cat([up[:start], up[end:]]))
        del adapter.layers[name]
    del state.adapters[adapter_name]
    _unwrap_idle(target, state)
    if not state.adapters:
        delattr(target, LORA_ATTR)


def _starts(state: _LoraState, name: str, layer: QuantLinear) -> dict[str, int]:
    """{adapter: first column of its segment} in layer `name`'s branch; segments follow the
    layer's own branch in load order."""
    segments = [(a, adapter.layers[name]) for a, adapter in state.adapters.items()
                if name in adapter.layers]
    start = layer.rank - sum(s.width for _, s in segments)
    starts = {}
    for a, segment in segments:
        starts[a], start = start, start + segment.width
    return starts


def _branch_like(layer: QuantLinear, dtype: torch.dtype) -> torch.Tensor:
    """A tensor with the dtype and device of the layer's branch; a layer without one takes those of
    its bias or float weight, else `dtype` (the model's) on the layer's device."""
    for t in (layer.lora_down, layer.bias, getattr(layer, "weight", None)):
        if t is not None:
            return t
    return layer.qweight.codes.new_empty(0, dtype=dtype)


def _down_columns(layer: QuantLinear, down: torch.Tensor, width: int,
                  like: torch.Tensor) -> torch.Tensor:
    """diag(λ) Aᵀ [K, width] (H diag(λ) Aᵀ for a rotated layer): the LoRA's down factor acting on
    the branch's input x̂, zero-padded to `width`."""
    columns = down.detach().to(like.device, torch.float32).T
    if layer.smooth is not None:
        columns = columns * layer.smooth.float()[:, None]
    if layer.rotate:
        columns = hadamard_rotate(columns.T).T
    return F.pad(columns, (0, width - columns.shape[1])).to(like.dtype)


def _up_rows(segment: _Segment, strength: float, like: torch.Tensor) -> torch.Tensor:
    """(alpha / r) strength Bᵀ [width, N], zero-padded rows."""
    rows = segment.up.to(like.device, torch.float32).T * (segment.factor * strength)
    return F.pad(rows, (0, 0, 0, segment.width - rows.shape[0])).to(like.dtype)


def _set_branch(layer: QuantLinear, down: torch.Tensor, up: torch.Tensor) -> None:
    """Make down [K, r] and up [r, N] the layer's branch (none when r = 0)."""
    grad = layer.lora_down.requires_grad if layer.lora_down is not None else True
    rank = down.shape[1]
    layer.lora_down = nn.Parameter(down, requires_grad=grad) if rank else None
    layer.lora_up = nn.Parameter(up, requires_grad=grad) if rank else None
    layer.rank = rank
    _refresh_kernels(layer)


def _refresh_kernels(layer: QuantLinear) -> None:
    """Bring the kernels' copy of the layer up to date with its branch, if the layer has one."""
    layout = getattr(layer, "kernel_layout", None)
    if layout is None:
        return
    if layer.kernel_kind == kernel_kind(layer) == "int8":
        prepare_branch(layer)  # the weights' runtime layout stays as it is
    else:
        prepare(layer, layout)


def _wrap(target: nn.Module, state: _LoraState, name: str, linear: nn.Linear,
          paths: list[str]) -> QuantLinear:
    """Replace a full-precision Linear by an unquantized QuantLinear on the same weight and bias
    (same output, plus a branch)."""
    wrapper = QuantLinear(linear.in_features, linear.out_features, linear.bias is not None,
                          weight_spec=None, act_spec=None, device="meta")
    wrapper.weight, wrapper.bias = linear.weight, linear.bias
    wrapper.train(linear.training)
    state.wrapped[name] = linear
    tx = Transaction(target)
    for path in paths:
        tx.swap(path, wrapper)
    return wrapper


def _unwrap_idle(target: nn.Module, state: _LoraState) -> None:
    """Put back the full-precision Linear layers that no adapter uses any more."""
    used = {name for adapter in state.adapters.values() for name in adapter.layers}
    idle = [name for name in state.wrapped if name not in used]
    if not idle:
        return
    paths, tx = module_paths(target), Transaction(target)
    for name in idle:
        original = state.wrapped.pop(name)
        for path in paths[id(target.get_submodule(name))]:
            tx.swap(path, original)
