"""QuantMatMul: a product of two activations, such as attention's q @ kᵀ and attn @ v."""
from __future__ import annotations

import torch
from torch import nn

from ..config import QuantSpec
from .base import QuantModule
from .timestep import make_act_quantizer


class QuantMatMul(QuantModule):
    """a @ b with both operands fake-quantized.

    a [..., M, K] is quantized with K as its last dim; b [..., K, N] is quantized as bᵀ, so that for
    both operands the reduction dim K is the quantizer's last dim (a "token" of b is one column).
    A spec of None leaves that operand in full precision (e.g. post-Softmax probabilities handled by
    a log2 quantizer elsewhere).
    """

    def __init__(self, a_spec: QuantSpec | None, b_spec: QuantSpec | None, act_buckets: int = 0):
        super().__init__()
        self.a_spec, self.b_spec = a_spec, b_spec
        self.a_quantizer = make_act_quantizer(a_spec, act_buckets) if a_spec is not None else None
        self.b_quantizer = make_act_quantizer(b_spec, act_buckets) if b_spec is not None else None

    def act_quantizers(self) -> list[nn.Module]:
        return [q for q in (self.a_quantizer, self.b_quantizer) if q is not None]

    def observe(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if self.a_quantizer is not None and not self.a_quantizer.spec.dynamic:
            self.a_quantizer.observe(a)
        if self.b_quantizer is not None and not self.b_quantizer.spec.dynamic:
            self.b_quantizer.observe(b.transpose(-1, -2))

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if self.act_enabled:
            if self.a_quantizer is not None:
                a = self.a_quantizer(a)
            if self.b_quantizer is not None:
                b = self.b_quantizer(b.transpose(-1, -2)).transpose(-1, -2)
        return a @ b
