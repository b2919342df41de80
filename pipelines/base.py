"""The adapter interface and the registry that maps a model to its family's adapter."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn


@dataclass(frozen=True)
class Adapter:
    """What vqz knows about one model family.

    claims(model): whether this adapter applies. default_rules: LayerRules applied before the user's
    (e.g. keep embeddings and final projections in 16-bit, each with its reason in `notes`).
    splits(model): {Conv2d name: input-channel split points} for split-shortcut quantization.
    attention(module): whether `module` is an attention module vqz.nn.QuantAttention replaces
    (its products are quantized when the config has `attn`).
    norm_consumers(model): {LayerNorm name: names of the Linear layers reading its output}, the
    pairs a `repq` config reparameterizes.
    family: the preset family whose recipes fit these models ("vit", "depth"; see
    vqz.config.FAMILY_PRESETS): generic preset names resolve to that family's recipe, and another
    family's recipe is refused. blocks(model): names of the blocks whose output a `reconstruct`
    config matches (transformer layers, in execution order).
    """

    name: str
    claims: Callable[[nn.Module], bool]
    default_rules: tuple = ()
    notes: dict = field(default_factory=dict)
    splits: Callable[[nn.Module], dict] = lambda model: {}
    attention: Callable[[nn.Module], bool] = lambda module: False
    norm_consumers: Callable[[nn.Module], dict] = lambda model: {}
    family: str | None = None
    blocks: Callable[[nn.Module], list] = lambda model: []


GENERIC = Adapter("generic", claims=lambda model: True)
_ADAPTERS: list[Adapter] = []


def register_adapter(adapter: Adapter) -> None:
    _ADAPTERS.append(adapter)


def adapter_for(model: nn.Module) -> Adapter:
    for adapter in _ADAPTERS:
        if adapter.claims(model):
            return adapter
    return GENERIC
