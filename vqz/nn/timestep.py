"""Static activation scales per timestep range of a denoiser (TFMQ-DM / Q-Diffusion style).

A denoiser's activation ranges drift along the sampling trajectory. `BucketedQuantizer` keeps one
static quantizer per timestep range; `TimestepState`, registered on the denoiser, reads the timestep
of each call so every bucketed quantizer inside it knows which range applies.
"""
from __future__ import annotations

import bisect

import torch
from torch import nn

from ..calib.timestep import timestep_arg
from ..config import QuantSpec
from ..quantizer import Quantizer

STATE_NAME = "_vqz_timestep"


class TimestepState(nn.Module):
    """The timestep of the denoiser call in progress, set by a forward pre-hook on the denoiser:
    `samples` (1-dim float64, on the timestep's device: one timestep, or one per sample of the
    batch), `tensor` (its first element, 0-dim; what compiled graphs read), `value` (that as a
    float) and `mixed` (whether the samples' timesteps differ). While `history` is a list, every
    call's timestep `value` is appended to it (calibration)."""

    def __init__(self):
        super().__init__()
        self.samples: torch.Tensor | None = None
        self.tensor: torch.Tensor | None = None
        self._value: float | None = None
        self._mixed = False
        self.history: list[float] | None = None

    @property
    def value(self) -> float | None:
        """The timestep as a float, None outside a denoiser call. Read from `samples` at the first
        use in a call: it waits for the device, which a compiled graph cannot do."""
        if self._value is None and self.samples is not None:
            first, lo, hi = torch.stack([self.tensor, self.samples.min(), self.samples.max()]).tolist()
            self._value, self._mixed = first, lo != hi
        return self._value

    @property
    def mixed(self) -> bool:
        """Whether the batch's samples are at different timesteps (read with `value`)."""
        return self.value is not None and self._mixed

    def hook(self, module, args, kwargs) -> None:
        t = timestep_arg(module, args, kwargs)
        self.samples = None if t is None else torch.as_tensor(t, dtype=torch.float64).reshape(-1)
        self.tensor = None if t is None else self.samples[0]
        self._value = None
        if self.history is not None and self.value is not None:
            self.history.append(self.value)

    def clear(self, module, args, output) -> None:
        # Outside a denoiser call no timestep applies: a layer run on its own must not reuse one.
        self.samples = self.tensor = self._value = None


def attach_timestep_state(denoiser: nn.Module) -> TimestepState:
    """Register a TimestepState on the denoiser (submodule `_vqz_timestep`, with its forward
    pre-hook). A submodule, so that copies of the model carry their own state and hook."""
    state = TimestepState()
    denoiser.add_module(STATE_NAME, state)
    state.handles = (denoiser.register_forward_pre_hook(state.hook, with_kwargs=True),
                     denoiser.register_forward_hook(state.clear))
    return state


def detach_timestep_state(denoiser: nn.Module) -> None:
    for handle in getattr(denoiser, STATE_NAME).handles:
        handle.remove()
    delattr(denoiser, STATE_NAME)


def use_timestep_state(layers, state: TimestepState, edges: torch.Tensor | None = None) -> None:
    """Point the bucketed activation quantizers of `layers` (QuantModules) at `state`, and give
    them their timestep `edges` (calibration; a loaded checkpoint brings its own)."""
    for layer in layers:
        for q in layer.act_quantizers():
            if isinstance(q, BucketedQuantizer):
                q.use_state(state)
                if edges is not None:
                    q.set_edges(edges)


def bucket_edges(timesteps: list[float], buckets: int) -> torch.Tensor:
    """Boundaries [buckets - 1] splitting the distinct calibration timesteps into `buckets` ranges
    holding equally many of them."""
    distinct = sorted(set(timesteps))
    if len(distinct) < buckets:
        raise ValueError(f"timestep_buckets={buckets} needs calibration at {buckets} or more "
                         f"distinct timesteps of the denoiser, got {len(distinct)}; calibrate over "
                         f"more steps or use fewer buckets (timestep_buckets=0: one range)")
    cuts = [round(i * len(distinct) / buckets) for i in range(1, buckets)]
    return torch.tensor([(distinct[c - 1] + distinct[c]) / 2 for c in cuts], dtype=torch.float64)


class BucketedQuantizer(nn.Module):
    """An activation quantizer with one Quantizer(spec) per timestep range: static scales, or
    (QAT) a learned clip ratio of dynamic ranges.

    `edges` [B - 1] (float64 buffer, ascending, set by `set_edges` at calibration) splits
    timesteps into B ranges; range i uses `quantizers[i]`. The TimestepState is attached by
    `use_state` (a plain attribute, shared by all bucketed quantizers of one denoiser).
    """

    def __init__(self, spec: QuantSpec, buckets: int):
        super().__init__()
        if spec.dynamic and not spec.learnable:
            raise ValueError("dynamic activation scales need no timestep buckets (unless their "
                             "clip ratio is learned: learnable=True)")
        self.spec = spec
        self.quantizers = nn.ModuleList(Quantizer(spec) for _ in range(buckets))
        self.register_buffer("edges", torch.zeros(buckets - 1, dtype=torch.float64))
        self.__dict__["state"] = None
        self.__dict__["_edge_list"] = []  # edges as floats: picking a range needs no device sync

    def use_state(self, state: TimestepState) -> None:
        self.__dict__["state"] = state

    def set_edges(self, edges: torch.Tensor) -> None:
        self.edges.copy_(edges)
        self.__dict__["_edge_list"] = self.edges.tolist()

    def current(self) -> Quantizer:
        return self.quantizers[bisect.bisect_left(self._edge_list, self._timestep().value)]

    def _timestep(self) -> TimestepState:
        if self.state is None or self.state.tensor is None:
            raise RuntimeError("this layer has per-timestep activation scales but the denoiser's "
                               "timestep is unknown: run it through the denoiser's forward with a "
                               "timestep argument")
        return self.state

    @property
    def calibrated(self) -> bool:
        return all(q.calibrated for q in self.quantizers)

    def observe(self, x: torch.Tensor) -> None:
        self.current().observe(x)

    def finalize(self) -> None:
        for i, q in enumerate(self.quantizers):
            try:
                q.finalize()
            except ValueError as e:
                raise ValueError(f"timestep range {i} got no calibration data") from e

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            # A range picked in Python would make the graph guard on the timestep's value and
            # recompile at every step: the graph computes every range's output and keeps one.
            t = self._timestep().tensor.to(self.edges.device).reshape(1)
            outputs = torch.stack([q(x) for q in self.quantizers])
            return outputs.index_select(0, torch.searchsorted(self.edges, t))[0]
        if self._timestep().mixed:
            return self._per_sample(x)
        return self.current()(x)

    def _per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """x's rows quantized each by the range of its sample's timestep (a batch mixing
        timesteps: QAT on several recorded calls at once). Rows are the batch's samples in order,
        each repeated when x flattens more leading dimensions into its first."""
        t = self.state.samples
        if x.shape[0] % t.numel():
            raise RuntimeError(f"the denoiser got {t.numel()} per-sample timesteps, but this layer's "
                               f"input {tuple(x.shape)} does not split into that many samples along "
                               f"its first dimension; call the denoiser with one timestep")
        ranges = torch.searchsorted(self.edges, t.to(self.edges.device))
        ranges = ranges.to(x.device).repeat_interleave(x.shape[0] // t.numel())
        out = torch.empty_like(x)
        for i, q in enumerate(self.quantizers):
            rows = (ranges == i).nonzero().squeeze(1)
            if rows.numel():
                out = out.index_copy(0, rows, q(x.index_select(0, rows)))
        return out

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "edges" in state_dict:
            self.__dict__["_edge_list"] = state_dict[prefix + "edges"].tolist()


def make_act_quantizer(spec: QuantSpec, buckets: int = 0) -> nn.Module:
    """The activation quantizer for `spec`: per timestep range when buckets > 1 and something is
    learned or calibrated (static scales, or a learnable clip ratio), else a plain Quantizer."""
    if buckets > 1 and (not spec.dynamic or spec.learnable):
        return BucketedQuantizer(spec, buckets)
    return Quantizer(spec)
