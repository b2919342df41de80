"""QuantConv2d: a 2-D convolution with quantized weights and (split) activations."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QuantSpec
from .base import QuantModule, quantize_channels_last
from .timestep import make_act_quantizer
from .weight import QuantWeight


class QuantConv2d(QuantModule):
    """Conv2d with quantized weights and activations.

    `splits` cuts the input channels into ranges [0, s1), [s1, s2), ..., [sk, C); each range gets its
    own activation quantizer and its own weight quantizer (split-shortcut quantization of UNet
    skip concatenations: Q(x1)Q(W1) + Q(x2)Q(W2)). Activations are quantized with channels as the
    last dim (a "token" is a pixel). Weights are viewed as [out, in_range * kh * kw].
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 weight_spec: QuantSpec, act_spec: QuantSpec | None, splits: tuple = (),
                 act_buckets: int = 0, device=None, dtype=None):
        super().__init__()
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device="meta")
        self.in_channels, self.out_channels, self.groups = in_channels, out_channels, groups
        self.kernel_size, self.stride, self.dilation = conv.kernel_size, conv.stride, conv.dilation
        self.padding, self.padding_mode = conv.padding, padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice
        self.weight_spec, self.act_spec = weight_spec, act_spec
        self.ranges = _channel_ranges(in_channels, splits, groups)
        self.splits = tuple(splits)
        taps = self.kernel_size[0] * self.kernel_size[1]
        per_group_in = in_channels // groups
        widths = [e - s for s, e in self.ranges] if groups == 1 else [per_group_in]
        self.qweights = nn.ModuleList(
            QuantWeight(weight_spec, out_channels, w * taps, device=device) for w in widths)
        self.input_quantizers = nn.ModuleList(
            make_act_quantizer(act_spec, act_buckets) for _ in self.ranges) if act_spec is not None else None
        self.bias = nn.Parameter(torch.empty(out_channels, device=device, dtype=dtype)) if bias else None

    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                   splits: tuple = (), act_buckets: int = 0) -> QuantConv2d:
        w = conv.weight.detach()
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                    weight_spec=weight_spec, act_spec=act_spec, splits=splits,
                    act_buckets=act_buckets, device=w.device, dtype=w.dtype)
        pieces = [w] if conv.groups > 1 else [w[:, s:e] for s, e in layer.ranges]
        layer.qweights = nn.ModuleList(
            QuantWeight.from_float(p.reshape(p.shape[0], -1), weight_spec) for p in pieces)
        if conv.bias is not None:
            layer.bias.data.copy_(conv.bias.detach())
        return layer

    def dequantized_weight(self, dtype=torch.float32) -> torch.Tensor:
        kh, kw = self.kernel_size
        parts = [qw(dtype).reshape(self.out_channels, -1, kh, kw) for qw in self.qweights]
        return torch.cat(parts, dim=1)

    def act_quantizers(self) -> list[nn.Module]:
        return [] if self.input_quantizers is None else list(self.input_quantizers)

    def observe(self, x: torch.Tensor) -> None:
        if self.input_quantizers is None:
            return
        for (s, e), q in zip(self.ranges, self.input_quantizers):
            if not q.spec.dynamic:
                q.observe(x[:, s:e].movedim(1, -1))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizers is None or not self.act_enabled:
            return x
        if len(self.ranges) == 1:
            return quantize_channels_last(self.input_quantizers[0], x)
        return torch.cat([quantize_channels_last(q, x[:, s:e])
                          for (s, e), q in zip(self.ranges, self.input_quantizers)], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = self.quantize_input(x)
        w = self.dequantized_weight(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.padding_mode != "zeros":
            xq = F.pad(xq, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(xq, w, bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(xq, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, groups={self.groups}, splits={self.splits}")


def _channel_ranges(channels: int, splits, groups: int) -> list[tuple[int, int]]:
    points = [0, *splits, channels]
    if splits and groups != 1:
        raise ValueError(f"input splits need groups=1 (got groups={groups}); a grouped convolution "
                         f"already keeps its channel groups apart")
    if any(not isinstance(p, int) for p in splits) or points != sorted(set(points)):
        raise ValueError(f"splits {tuple(splits)} must be increasing integers strictly between 0 and "
                         f"the {channels} input channels")
    return list(zip(points[:-1], points[1:]))
