"""Weight reconstruction (QuartDepth, after AdaRound/BRECQ): learn each INT weight's rounding
direction against the output error of the block that holds it.

Each weight element rounds to floor(w/s) + h(V), h the rectified sigmoid clamp(σ(V)(ζ-γ) + γ, 0, 1),
V initialised so that h(V) = frac(w/s). Adam on V minimises the block's normalised output MSE
against its full-precision output (from the same full-precision inputs, activations quantized)
plus a regulariser Σ(1 - |2h - 1|^β) that pushes h to 0 or 1 (β annealed 20 -> 2). Afterwards
h >= 0.5 rounds up. The block keeps whichever rounding, learned or the one it had, gives the lower
output error on the calibration inputs.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calib.hooks import run_hooked
from ..nn import QuantLinear, QuantWeight
from ..quantizer import Quantizer

ZETA, GAMMA = 1.1, -0.1
WARMUP = 0.2  # fraction of steps without the rounding regulariser
REG_WEIGHT = 3.0  # strong: with ~200 steps, decisions must settle early (AdaRound uses 0.01 over 20k)


def capture_block_io(model: nn.Module, names: list[str], forward_loop: Callable[[], None]) -> dict:
    """{block name: [(args, kwargs, output tensor), ...]}, one entry per call in the loop. All of
    it stays in memory (two activations per block per calibration batch): keep calibration small."""
    records = {name: [] for name in names}

    def hook_for(name):
        def hook(module, args, kwargs, output):
            records[name].append((_detach(args), _detach(kwargs), _first_tensor(output).detach()))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(hook_for(n), with_kwargs=True)
               for n in names]
    run_hooked(handles, forward_loop)
    missing = [n for n, calls in records.items() if not calls]
    if missing:
        raise ValueError(f"calibration never ran block(s) {missing[:5]}; give calibration inputs "
                         f"that reach them, or set reconstruct=0")
    return records


class SoftRounding(nn.Module):
    """A quantized weight with learnable rounding; called like QuantWeight (dtype -> [N, K])."""

    def __init__(self, w: torch.Tensor, spec):
        super().__init__()
        w = w.detach().float()
        self.spec = spec
        self.quantizer = Quantizer(spec).fit(w)
        self.q = self.quantizer.quantize(w)
        fmt = self.quantizer.fmt
        self.lo, self.hi = fmt.min_value, fmt.max_value
        # per-element step and the value of code 0, read off the quantizer's own dequantize
        zero = self._dequantize(fmt.encode(torch.zeros_like(w, dtype=torch.float32)))
        self.step = self._dequantize(fmt.encode(torch.ones_like(w, dtype=torch.float32))) - zero
        self.zero = zero
        v = (w - zero) / self.step
        self.base = v.floor()
        rest = (v - self.base).clamp(0.01, 0.99)
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantizer.dequantize({**self.q, "codes": codes})

    def h(self) -> torch.Tensor:
        return (torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)

    def forward(self, dtype=torch.float32) -> torch.Tensor:
        codes = (self.base + self.h()).clamp(self.lo, self.hi)
        return (self.zero + codes * self.step).to(dtype)

    def regulariser(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.h() - 1).abs().pow(beta)).mean()

    def hardened(self) -> QuantWeight:
        codes = self.quantizer.fmt.encode((self.base + (self.v >= 0).float()).clamp(self.lo, self.hi))
        return QuantWeight.from_quantized({**self.q, "codes": codes}, self.spec)


def learnable(layer: nn.Module) -> bool:
    """INT weights with element scales: what learned rounding applies to."""
    spec = getattr(layer, "weight_spec", None)
    return isinstance(layer, QuantLinear) and spec is not None and spec.format.startswith("int") \
        and spec.fmt.block_size is None


def reconstruct_block(block: nn.Module, calls: list, weights: dict[str, torch.Tensor],
                      steps: int, lr: float = 0.1) -> tuple[float, float]:
    """Learn the rounding of the QuantLinear layers of `block` named in `weights` ({name relative to
    the block: full-precision weight [N, K] to round}) over `steps` Adam steps, one recorded call
    per step. Returns (output error before, after): normalised MSE over all calls."""
    layers = {n: block.get_submodule(n) for n in weights}
    before = _block_error(block, calls)
    kept = {n: layer.qweight for n, layer in layers.items()}
    soft = {n: SoftRounding(weights[n].to(kept[n].codes.device), layer.weight_spec)
            for n, layer in layers.items()}
    frozen = [p for p in block.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for n, layer in layers.items():
        layer.qweight = soft[n]
        layer.forward = layer.reference_forward  # fused kernels read codes, not the soft weight
    try:
        optimizer = torch.optim.Adam([s.v for s in soft.values()], lr=lr)
        with torch.enable_grad():
            for step in range(steps):
                args, kwargs, target = calls[step % len(calls)]
                out = _first_tensor(block(*args, **kwargs))
                # relative to the error the block started from: the regulariser's weight then
                # means the same whatever the block's output scale
                loss = _normalised_error(out, target) / max(before, 1e-12)
                progress = (step / steps - WARMUP) / (1 - WARMUP)
                if progress >= 0:
                    beta = 20 + (2 - 20) * progress
                    loss = loss + REG_WEIGHT * sum(s.regulariser(beta) for s in soft.values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
        for n, layer in layers.items():
            del layer.forward
            layer.qweight = soft[n].hardened()
    after = _block_error(block, calls)
    if after > before:
        for n, layer in layers.items():
            layer.qweight = kept[n]
        after = before
    return before, after


def _normalised_error(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12)


def reconstruct_blocks(model: nn.Module, block_io: dict, layers: dict, weights: dict,
                       steps: int) -> None:
    """Learned rounding block by block (in `block_io`'s order, execution order) for the quantized
    layers `layers` ({name: module}) with INT weights, from their full-precision weights
    (`weights` {name: [N, K]}: the compensated ones where compensation ran)."""
    for block_name in tqdm(list(block_io), desc="vqz reconstruct", unit="block", leave=False,
                           disable=not block_io):
        prefix = block_name + "."
        mine = {n[len(prefix):]: w for n, w in weights.items()
                if n.startswith(prefix) and learnable(layers[n])}
        if mine:
            reconstruct_block(model.get_submodule(block_name), block_io.pop(block_name), mine, steps)


@torch.no_grad()
def _block_error(block: nn.Module, calls: list) -> float:
    return sum(_normalised_error(_first_tensor(block(*a, **k)), t).item() for a, k, t in calls) / len(calls)


def _first_tensor(output):
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return _first_tensor(output[0])
    if isinstance(output, dict):
        return _first_tensor(next(iter(output.values())))
    raise TypeError(f"block output of type {type(output).__name__} holds no tensor to match")


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    if isinstance(value, dict):
        return {k: _detach(v) for k, v in value.items()}
    return value
