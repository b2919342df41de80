"""QATLinear: y = Qa(x̂) (Q(W') + L diag(fade) R)ᵀ + b, the QVGen training wrapper of a Linear layer,
with x̂ = x / λ and W' = W diag(λ) (λ: optional SVDQuant-style smoothing, fixed during training),
both times the block Hadamard matrix H when the layer rotates. With a kept branch it is SVDQuant's
layer instead, trained: y = Qa(x̂) Q(W' - (L R)ᵀ)ᵀ + x̂ L R + b."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantSpec
from ..nn.linear import QuantLinear, split_weight
from ..nn.rotation import quantizer_input
from ..nn.timestep import make_act_quantizer
from ..nn.weight import QuantWeight
from ..quantizer import Quantizer


class QATLinear(nn.Module):
    """A Linear layer under quantization-aware training.

    `weight` [N, K]: the trained full-precision weight W' (W diag(λ), times H with `rotate`),
    fake-quantized by `weight_quantizer` (LSQ+: learnable scales, initialised by the spec's
    observer). `smooth` [K] (buffer, float32, or None): the per-input-channel divisor λ of the
    input. `act_quantizer`: the input's quantizer (a learnable dynamic spec learns clip ratios, per
    timestep range with `act_buckets` > 1). `lora_down` [K, r], `lora_up` [r, N]: the auxiliary
    branch on the quantized input, initialised from the SVD of (W' - Q(W'))ᵀ; `fade` [r] (buffer)
    multiplies its directions (1 kept, u fading, 0 gone) and `phase` (buffer) is the decay phase
    the factors were last re-factorised for.

    `lowrank` = (L1 [K, r], L2 [r, N]), the top-r SVD factors of W'ᵀ (before rotation) as
    svd_quantize gives them, keeps the branch instead (`keep_branch`; r must equal `rank`): it
    starts as (H L1, L2), acts on x̂ itself (16-bit, not quantized), `weight` is the residual
    W' - (H L1 L2)ᵀ with the weight quantizer fitted on it, the rank schedule leaves it alone (fade
    stays 1) and export keeps it. Untrained, the layer then computes what
    `QuantLinear.from_float(linear, ..., smooth=λ, lowrank=(L1, L2))` does.
    """

    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                 rank: int, act_buckets: int = 0, smooth: torch.Tensor | None = None,
                 rotate: bool = False, lowrank: tuple[torch.Tensor, torch.Tensor] | None = None):
        super().__init__()
        if not weight_spec.learnable or (act_spec is not None and not act_spec.learnable):
            raise ValueError("QAT needs learnable weight and activation specs (learnable=True)")
        n, k = linear.weight.shape
        if not 0 <= rank <= min(n, k):
            raise ValueError(f"rank {rank} does not fit a {n}x{k} weight")
        if lowrank is not None and lowrank[0].shape[1] != rank:
            raise ValueError(f"the kept branch has rank {lowrank[0].shape[1]}, the layer rank {rank}; "
                             f"pass lowrank factors of rank {rank}")
        dtype = linear.weight.dtype
        residual, branch = split_weight(linear.weight.detach(), smooth, lowrank, rotate)
        self.in_features, self.out_features, self.rotate = k, n, rotate
        self.keep_branch = lowrank is not None
        self.weight = nn.Parameter(residual.to(dtype, copy=True))  # never the original's storage
        w = self.weight.detach().float()
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.weight_quantizer = Quantizer(weight_spec).fit(w)
        self.act_quantizer = None if act_spec is None else make_act_quantizer(act_spec, act_buckets)
        self.act_buckets = act_buckets
        if branch is None:
            u, s, vh = torch.linalg.svd((w - self.weight_quantizer(w)).T, full_matrices=False)
            root = s[:rank].sqrt()
            branch = ((u[:, :rank] * root).to(dtype), (root[:, None] * vh[:rank]).to(dtype))
        self.lora_down, self.lora_up = nn.Parameter(branch[0]), nn.Parameter(branch[1])
        self.register_buffer("smooth", None if smooth is None else smooth.float().to(w.device))
        self.register_buffer("fade", torch.ones(rank, device=w.device))
        self.register_buffer("phase", torch.tensor(-1, device=w.device))
        self.live = rank > 0  # any direction of the branch not yet faded out (mirrors `fade`)

    @property
    def rank(self) -> int:
        return self.fade.numel()

    def act_quantizers(self) -> list[nn.Module]:
        return [] if self.act_quantizer is None else [self.act_quantizer]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantizer_input(x, self.smooth, self.rotate)
        xq = x if self.act_quantizer is None else self.act_quantizer(x)
        w = self.weight_quantizer(self.weight)
        y = F.linear(xq, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.live:
            branch_in = x if self.keep_branch else xq
            y = y + ((branch_in @ self.lora_down.to(x.dtype)) * self.fade.to(x.dtype)) \
                @ self.lora_up.to(x.dtype)
        return y

    @torch.no_grad()
    def refactor(self, active: int) -> None:
        """Re-factorise the branch as it now acts (fade folded in) by its SVD, singular directions
        in decreasing order, keeping the top `active` and zeroing the rest. Via QR of both factors,
        so the cost is O((N + K) r²), not an SVD of the [N, K] product."""
        down = self.lora_down.float() * self.fade
        q_down, r_down = torch.linalg.qr(down)
        q_up, r_up = torch.linalg.qr(self.lora_up.float().T)
        u, s, vh = torch.linalg.svd(r_down @ r_up.T)
        root = s.sqrt()
        root[active:] = 0
        self.lora_down.copy_(q_down @ (u * root))
        self.lora_up.copy_((root[:, None] * vh) @ q_up.T)

    def set_fade(self, kept: int, fading: int, u: float) -> None:
        self.fade.zero_()
        self.fade[:kept] = 1.0
        self.fade[kept:kept + fading] = u
        self.live = kept + fading > 0

    def to_quant_linear(self) -> QuantLinear:
        """The quantized layer (learned scales frozen): with a kept branch, SVDQuant's layer with
        the trained branch; else a plain one, and the decaying branch must be gone."""
        if not self.keep_branch and self.rank and self.fade.any():
            raise ValueError(f"the low-rank branch still has rank {int((self.fade > 0).sum())}; "
                             f"train to the end of the rank schedule before exporting")
        spec = replace(self.weight_quantizer.spec, learnable=False)
        w = self.weight.detach()
        layer = QuantLinear(self.in_features, self.out_features, self.bias is not None,
                            weight_spec=spec, act_spec=None if self.act_quantizer is None else
                            self.act_quantizer.spec, act_buckets=self.act_buckets,
                            rank=self.rank if self.keep_branch else 0,
                            smooth=self.smooth is not None, rotate=self.rotate, device=w.device,
                            dtype=w.dtype)
        if self.smooth is not None:
            layer.smooth.copy_(self.smooth)
        if layer.rank:
            layer.lora_down.data.copy_(self.lora_down.detach())
            layer.lora_up.data.copy_(self.lora_up.detach())
        layer.qweight = QuantWeight.from_quantized(self.weight_quantizer.quantize(w.float()), spec)
        if self.act_quantizer is not None:
            layer.act_quantizer.load_state_dict(self.act_quantizer.state_dict())
            layer.act_quantizer.requires_grad_(False)
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}{', kept' if self.keep_branch else ''}, bias={self.bias is not None}")
