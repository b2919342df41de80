"""QATLinear: y = Qa(x̂) (Q(W') + L diag(fade) R)ᵀ + b, the QVGen training wrapper of a Linear layer,
with x̂ = x / λ and W' = W diag(λ) (λ: optional SVDQuant-style smoothing, fixed during training),
both times the block Hadamard matrix H when the layer rotates."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantSpec
from ..nn.linear import QuantLinear
from ..nn.rotation import hadamard_rotate, quantizer_input
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
    branch on the quantized input, initialised from the SVD of (W' - Q(W'))ᵀ; `fade` [r] (buffer) multiplies its directions (1 kept, u fading,
    0 gone) and `phase` (buffer) is the decay phase the factors were last re-factorised for.
    """

    def __init__(self, linear: nn.Linear, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                 rank: int, act_buckets: int = 0, smooth: torch.Tensor | None = None,
                 rotate: bool = False):
        super().__init__()
        if not weight_spec.learnable or (act_spec is not None and not act_spec.learnable):
            raise ValueError("QAT needs learnable weight and activation specs (learnable=True)")
        w = linear.weight.detach()
        if smooth is not None:
            w = (w.float() * smooth.float()).to(w.dtype)
        if rotate:
            w = hadamard_rotate(w)
        n, k = w.shape
        if not 0 <= rank <= min(n, k):
            raise ValueError(f"rank {rank} does not fit a {n}x{k} weight")
        self.in_features, self.out_features, self.rotate = k, n, rotate
        self.weight = nn.Parameter(w.clone())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone())
        self.weight_quantizer = Quantizer(weight_spec).fit(w.float())
        self.act_quantizer = None if act_spec is None else make_act_quantizer(act_spec, act_buckets)
        self.act_buckets = act_buckets
        u, s, vh = torch.linalg.svd((w.float() - self.weight_quantizer(w.float())).T,
                                    full_matrices=False)
        root = s[:rank].sqrt()
        self.lora_down = nn.Parameter((u[:, :rank] * root).to(w.dtype))
        self.lora_up = nn.Parameter((root[:, None] * vh[:rank]).to(w.dtype))
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
            y = y + ((xq @ self.lora_down.to(x.dtype)) * self.fade.to(x.dtype)) @ self.lora_up.to(x.dtype)
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
        """The plain quantized layer (learned scales frozen, no branch); the branch must be gone."""
        if self.rank and self.fade.any():
            raise ValueError(f"the low-rank branch still has rank {int((self.fade > 0).sum())}; "
                             f"train to the end of the rank schedule before exporting")
        spec = replace(self.weight_quantizer.spec, learnable=False)
        w = self.weight.detach()
        layer = QuantLinear(self.in_features, self.out_features, self.bias is not None,
                            weight_spec=spec, act_spec=None if self.act_quantizer is None else
                            self.act_quantizer.spec, act_buckets=self.act_buckets,
                            smooth=self.smooth is not None, rotate=self.rotate, device=w.device,
                            dtype=w.dtype)
        if self.smooth is not None:
            layer.smooth.copy_(self.smooth)
        layer.qweight = QuantWeight.from_quantized(self.weight_quantizer.quantize(w.float()), spec)
        if self.act_quantizer is not None:
            layer.act_quantizer.load_state_dict(self.act_quantizer.state_dict())
            layer.act_quantizer.requires_grad_(False)
        if self.bias is not None:
            layer.bias.data.copy_(self.bias.detach())
        return layer

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rank={self.rank}, bias={self.bias is not None}")
