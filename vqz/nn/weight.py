"""QuantWeight: a weight matrix held as codes and scales, dequantized on use."""
from __future__ import annotations

import torch
from torch import nn

from ..config import QuantSpec
from ..formats import pack_codes, unpack_codes
from ..quantizer import Quantizer


class QuantWeight(nn.Module):
    """A quantized [N, K] weight (N output channels, K the reduction dim).

    Buffers are the plain row-major on-disk format: `codes` (uint8; codes of 4 bits or fewer packed
    two per byte along K), `scale` and, where the spec has them, `zero_point` and `tensor_scale`.
    """

    def __init__(self, spec: QuantSpec, n: int, k: int, device=None):
        super().__init__()
        if spec.dynamic:
            raise ValueError("weights cannot use dynamic scales; set dynamic=False in the weight spec")
        self.spec, self.n, self.k = spec, n, k
        # A plain attribute, not a submodule: dequantize() needs no state, and the quantizer's own
        # buffers must not appear in the checkpoint next to ours.
        self.__dict__["_quantizer"] = Quantizer(spec)
        layout, self._signed = _buffer_layout(spec, k)
        for name, (tail, dtype) in layout.items():
            shape = (n, *tail) if tail is not None else ()
            self.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))

    @classmethod
    def from_float(cls, w: torch.Tensor, spec: QuantSpec) -> QuantWeight:
        """Quantize `w` [N, K] (any float dtype; math in float32) with round-to-nearest."""
        w = w.detach().float()
        return cls.from_quantized(Quantizer(spec).fit(w).quantize(w), spec)

    @classmethod
    def from_quantized(cls, q: dict[str, torch.Tensor], spec: QuantSpec) -> QuantWeight:
        """Hold precomputed codes and scales: `q` laid out as `Quantizer(spec).quantize(w)` returns
        them for a weight w [N, K] ({"codes": [N, K] unpacked, "scale", ...}; GPTQ gives these)."""
        n, k = q["codes"].shape
        qw = cls(spec, n, k, device=q["codes"].device)
        q = dict(q, codes=pack_codes(q["codes"], spec.fmt.bits))
        expected = dict(qw.named_buffers(recurse=False))
        if set(q) != set(expected):
            raise ValueError(f"a {spec.format} {spec.granularity} weight stores {sorted(expected)}, "
                             f"got {sorted(q)}")
        for name, value in q.items():
            if value.shape != expected[name].shape or value.dtype != expected[name].dtype:
                raise ValueError(f"{name}: expected {expected[name].dtype} "
                                 f"{tuple(expected[name].shape)}, got {value.dtype} {tuple(value.shape)}")
            setattr(qw, name, value.contiguous())
        return qw

    @property
    def device(self) -> torch.device:
        """Where the codes are (libraries that wrap layers, PEFT say, place adapters by it)."""
        return self.codes.device

    def forward(self, dtype=torch.float32) -> torch.Tensor:
        """The dequantized weight [N, K] in `dtype`."""
        from ..kernels.runtime import kernel_weight_values  # the kernels import this package

        values = kernel_weight_values(self, dtype)
        if values is not None:
            return values
        q = dict(self.named_buffers(recurse=False))
        q["codes"] = unpack_codes(q["codes"], self.spec.fmt.bits, self.k, signed=self._signed)
        return self._quantizer.dequantize(q).to(dtype)

    def extra_repr(self) -> str:
        group = f" {self.spec.group_size}" if self.spec.group_size else ""
        return f"{self.spec.format}, {self.n}x{self.k}, {self.spec.granularity}{group}"


def _buffer_layout(spec: QuantSpec, k: int) -> tuple[dict, bool]:
    """{name: (shape after the row dim, or None for a 0-dim tensor; dtype)} of the stored tensors of
    a K-column weight, and whether codes are signed. Read off a 2-row probe so the layout follows
    the quantizer's rules instead of restating them."""
    probe = torch.randn(2, k)
    q = Quantizer(spec).fit(probe).quantize(probe)
    signed = q["codes"].dtype == torch.int8
    q["codes"] = pack_codes(q["codes"], spec.fmt.bits)
    return {name: (tuple(t.shape[1:]) if t.dim() else None, t.dtype) for name, t in q.items()}, signed
