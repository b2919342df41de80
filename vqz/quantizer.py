"""Quantizer: a number format applied with a granularity and a scale source.

A `Quantizer` turns a float tensor x [..., K] into codes and scales (`quantize`/`dequantize`) or
fake-quantizes it for simulation and QAT (`forward`). The last dim of x is the reduction dim K of the
matmul that consumes it. Stored shapes of `scale` (and `zero_point`) per granularity:

    tensor   []          one scale
    channel  [C]         one per index along `spec.axis` (0: output rows of a weight [N, K])
    token    [..., 1]    one per row of x (dynamic only)
    group    [..., G]    G = ceil(K / g) per row; static scales from `observe` (activations) are
                         [G], shared by all rows; from `fit` (a weight [N, K]) they are [N, G]

A K that is not a multiple of g is zero-padded to one for the statistics (the last group is
partial); results equal quantizing the explicitly zero-padded tensor and slicing.

Symmetric: scale = absmax / fmt.max_value, x ~ code * scale. Asymmetric (INT only): the unsigned
format of the same bits, scale = (max - min) / qmax, zero_point = round(-min / scale) in [0, qmax],
x ~ (code - zero_point) * scale; zero_point is float32 (integer-valued unless learned by LSQ+).
Block formats (MXFP4, NVFP4) carry their own scales and are always computed from x.

A learnable dynamic spec (QAT) multiplies every computed range by `clip`, a trained scalar in
[CLIP_MIN, 1] (1 at start), so the scales are clip * range / fmt.max_value.

Two-level group scales (`spec.int_group_scales = L`): every row's group scales are integer
multiples 1..L of one unit scale per row (group scales are rounded up to the next multiple). The
quantizer holds the effective scales as above; `quantize` returns them split, "scale" [..., 1] the
unit and "group_scale" [..., G] (uint8) the multipliers.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .calib.reservoir import RowReservoir
from .config import QuantSpec
from .formats import BlockCodes, IntFormat

_RANGE_FLOOR = 1e-8  # smallest range a scale is made from, so all-zero input gives zeros, not 0/0
_MSE_RATIOS = [1 - i / 100 for i in range(71)]  # clipping ratios 1.00, 0.99, ..., 0.30 of "mse"
CLIP_MIN = 0.05  # smallest learned clip ratio of a dynamic range
_MSE_CHUNK = 2**25  # elements of x tried at several ratios in one pass


class _Identity(torch.autograd.Function):
    """Returns `value` exactly; the gradient goes to `x`, multiplied by `grad_scale`.

    Serves as the straight-through estimator (value = quantized x) and as LSQ's gradient scaling
    (value = x). Unlike `x + (value - x).detach()` it adds no rounding error, so forward() equals
    dequantize(quantize(x)) bit for bit."""

    @staticmethod
    def forward(ctx, x, value, grad_scale):
        ctx.grad_scale = grad_scale
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.grad_scale, None, None


def _to_code_domain(x: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    v = x * (1.0 / scale)  # a reciprocal per scale, a product per element: as the kernels do
    return v if zero_point is None else v + zero_point


def _from_code_domain(v: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    return (v if zero_point is None else v - zero_point) * scale


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def split_two_level(scale: Tensor, levels: int) -> tuple[Tensor, Tensor]:
    """Effective two-level group scales [..., G] -> (unit [..., 1] float32, multipliers [..., G]
    uint8). Exact: the largest multiplier is L, a power of two, so unit = max / L is recovered."""
    unit = scale.amax(-1, keepdim=True) / levels
    return unit, torch.round(scale / unit).to(torch.uint8)


class Quantizer(nn.Module):
    """Fake-quantizes, quantizes and dequantizes tensors x [..., K] as `spec` says.

    Static specs are calibrated first: `observe(x)` on calibration batches then `finalize()`, or
    `fit(w)` on a whole weight. That sets the buffers `scale` and, when asymmetric, `zero_point`
    (shapes in the module docstring); with `spec.learnable` they become `nn.Parameter`s trained by
    LSQ+ (`zero_point` then is the learnable offset in code units, LSQ+'s beta = -zero_point * scale).
    Dynamic specs and block formats hold no state.
    """

    # Sample budget of the percentile and mse observers, in rows of x's [-1, K] view.
    reservoir_rows = 4096

    def __init__(self, spec: QuantSpec):
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise TypeError(f"Quantizer needs a vqz.QuantSpec, got {type(spec).__name__}")
        self.spec = spec
        fmt = spec.fmt
        self.fmt = fmt if spec.symmetric else IntFormat(fmt.bits, signed=False)
        self._block = fmt.block_size is not None
        self._static = not (spec.dynamic or self._block)
        if spec.learnable and self._block:
            raise ValueError(f"learnable scales need an element format; the block format "
                             f"{spec.format} computes its scales from every input")
        if spec.learnable and spec.dynamic:
            # QAT of dynamic activations: the range of each input is multiplied by a learned ratio.
            self.clip = nn.Parameter(torch.ones(()))
        if self._static:
            self.register_buffer("scale", torch.empty(0))
            if not spec.symmetric:
                self.register_buffer("zero_point", torch.empty(0))
        self._reset_stats()

    @property
    def calibrated(self) -> bool:
        """Static scales are set (always True for dynamic specs and block formats)."""
        return not self._static or self.scale.numel() > 0

    # ---- calibration -------------------------------------------------------------------------

    def observe(self, x: Tensor) -> None:
        """Add a calibration batch x [..., K] to the running statistics (a no-op unless static).

        Min/max are exact running statistics; percentile and mse keep a uniform sample of at most
        `reservoir_rows * K` elements, so memory is bounded whatever the number of calls."""
        if self._static:
            self._observe(x, per_row=False, keep_all=False)

    def finalize(self) -> None:
        """Set the static `scale` (and `zero_point`) from what was observed, and free the statistics."""
        if not self._static:
            return
        if self._hi is None:
            raise ValueError("Quantizer.finalize(): nothing was observed; call observe(x) on "
                             "calibration batches first (or fit(x) for a weight)")
        with torch.no_grad():
            lo, hi = self._clip_range()
            scale, zero_point = self._qparams(lo, hi)
        self._set_qparams(self._two_level(scale.reshape(self._shape)),
                          None if zero_point is None else zero_point.reshape(self._shape))
        self._reset_stats()

    def fit(self, x: Tensor) -> Quantizer:
        """Calibrate on the whole tensor x [N, K] (a weight): observe(x) + finalize(), replacing
        earlier observations. Every element is used (no sampling), and group scales are per row
        ([N, G]). Returns self."""
        if self._static:
            self._reset_stats()
            self._observe(x, per_row=True, keep_all=True)
            self.finalize()
        return self

    def _reset_stats(self) -> None:
        self._shape = None  # stored scale shape of the observed granules
        self._lo = self._hi = None  # running per-granule min and max [C]; symmetric: _hi = max|x|
        self._samples = None  # sampled elements [C, S]
        self._reservoir = None

    @torch.no_grad()
    def _observe(self, x: Tensor, per_row: bool, keep_all: bool) -> None:
        self._check_float(x)
        v, shape = self._granules(x, per_row)
        if self._shape is not None and shape != self._shape:
            raise ValueError(f"calibration batch of shape {tuple(x.shape)} gives scales of shape "
                             f"{shape}, but earlier batches gave {self._shape}")
        self._shape = shape
        lo, hi = self._minmax(v)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        if lo is not None:
            self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        if self.spec.observer == "minmax":
            return
        if keep_all:
            self._samples = v
        else:
            self._sample(v, x.shape[-1])

    def _sample(self, v: Tensor, k: int) -> None:
        """Add the columns of v [C, M] (one element of every granule each) to the sample."""
        if self._reservoir is None:
            self._reservoir = RowReservoir(max(1, self.reservoir_rows * k // v.shape[0]))
        self._reservoir.add(v.T)
        self._samples = self._reservoir.sample.T

    def _clip_range(self) -> tuple[Tensor | None, Tensor]:
        """Per-granule clipping range (lo, hi) [C] chosen by the observer; symmetric: (None, max|x|)."""
        if self.spec.observer == "percentile":
            s = self._samples
            k = min(max(math.ceil(self.spec.percentile / 100 * s.shape[1]), 1), s.shape[1])
            if self.spec.symmetric:
                return None, s.abs().kthvalue(k, 1).values
            return -(-s).kthvalue(k, 1).values, s.kthvalue(k, 1).values
        if self.spec.observer == "mse":
            return self._mse_range()
        return self._lo, self._hi

    def _mse_range(self) -> tuple[Tensor | None, Tensor]:
        """The clipping ratio of the min/max range with the smallest sum |fq(x) - x|^lp per granule.

        Several ratios are tried per pass ([R, C, S] at once, R bounded by _MSE_CHUNK elements):
        many small passes cost far more than a few large ones."""
        s = self._samples
        ratios = torch.tensor(_MSE_RATIOS, device=s.device)
        errors = []
        for r in ratios.split(max(1, _MSE_CHUNK // s.numel())):
            r = r[:, None]  # [R, 1] against the per-granule range [C]
            lo = None if self._lo is None else self._lo * r
            scale, zero_point = self._qparams(lo, self._hi * r)
            zero_point = None if zero_point is None else zero_point[..., None]
            fake = self._fake(s, scale[..., None], zero_point)
            errors.append((fake - s).abs().pow(self.spec.lp).sum(-1))
        # argmin takes the first of equal errors: ratios run from 1 down, so a tie keeps the larger range
        best_ratio = ratios[torch.cat(errors).argmin(0)]
        return None if self._lo is None else self._lo * best_ratio, self._hi * best_ratio

    def _set_qparams(self, scale: Tensor, zero_point: Tensor | None) -> None:
        wrap = nn.Parameter if self.spec.learnable else (lambda t: t)
        self.scale = wrap(scale)
        if zero_point is not None:
            self.zero_point = wrap(zero_point)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Scale shapes are only known after calibration: an uncalibrated quantizer takes the stored ones.
        if self._static and not self.calibrated and prefix + "scale" in state_dict:
            def empty_like_stored(name):
                stored = state_dict.get(prefix + name)
                return None if stored is None else torch.empty(stored.shape, device=self.scale.device)
            self._set_qparams(empty_like_stored("scale"),
                              None if self.spec.symmetric else empty_like_stored("zero_point"))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # ---- quantization ------------------------------------------------------------------------

    def forward(self, x: Tensor) -> Tensor:
        """Fake-quantize x [..., K]: same shape and dtype. Gradients pass straight through to x;
        with `spec.learnable`, LSQ+ gradients reach `scale` (and `zero_point`), and x gets none where
        it is clipped."""
        self._check_float(x)
        if self._block:
            from .kernels.runtime import block_round  # the kernels import this module

            return _Identity.apply(x, block_round(self.fmt, x.detach()), 1.0)
        scale, zero_point = self._scale_for(x)
        xw = x.to(_work_dtype(x.dtype))
        if not self.spec.learnable:
            with torch.no_grad():
                out = self._fake(xw, self._expand(scale, x), self._expand(zero_point, x))
            return _Identity.apply(x, out.to(x.dtype), 1.0)
        # LSQ: scale gradients by 1/sqrt(elements per scale * largest code) to match x's updates;
        # a learned clip ratio (dynamic) is one number for the whole input and keeps its gradient.
        grad_scale = 1.0 / math.sqrt(x.numel() / scale.numel() * self.fmt.max_value) \
            if self._static else 1.0
        scale = self._expand(_Identity.apply(scale, scale, grad_scale), x)
        if zero_point is not None:
            zero_point = self._expand(_Identity.apply(zero_point, zero_point, grad_scale), x)
        v = _to_code_domain(xw, scale, zero_point)
        v = v.clamp(self.fmt.min_value, self.fmt.max_value)  # no gradient to x where it is clipped
        v = _Identity.apply(v, self.fmt.round(v.detach()), 1.0)
        return _from_code_domain(v, scale, zero_point).to(x.dtype)

    @torch.no_grad()
    def quantize(self, x: Tensor) -> dict[str, Tensor]:
        """x [..., K] -> {"codes": int8/uint8 shaped like x, "scale": float32 in the stored shape,
        "zero_point": float32 like scale (asymmetric only)}. Block formats: {"codes", "scale": the
        uint8 block scale codes, "tensor_scale": fp32 per-tensor scale (NVFP4 only)}."""
        self._check_float(x)
        if self._block:
            bc = self.fmt.encode(x)
            q = {"codes": bc.codes, "scale": bc.scales}
            if bc.tensor_scale is not None:
                q["tensor_scale"] = bc.tensor_scale
            return q
        scale, zero_point = self._scale_for(x)
        v = _to_code_domain(x.to(_work_dtype(x.dtype)), self._expand(scale, x),
                            self._expand(zero_point, x))
        q = {"codes": self.fmt.encode(v), "scale": scale.detach().clone()}
        if self.spec.int_group_scales:
            q["scale"], q["group_scale"] = split_two_level(q["scale"], self.spec.int_group_scales)
        if zero_point is not None:
            q["zero_point"] = zero_point.detach().clone()
        return q

    def dequantize(self, q: dict[str, Tensor], dtype: torch.dtype = torch.float32) -> Tensor:
        """The values [..., K] in `dtype` of the output of `quantize`."""
        if self._block:
            return self.fmt.decode(BlockCodes(q["codes"], q["scale"], q.get("tensor_scale")), dtype)
        codes = q["codes"]
        scale = q["scale"]
        if "group_scale" in q:
            scale = scale * q["group_scale"].float()
        scale = self._expand(scale, codes)
        zero_point = self._expand(q.get("zero_point"), codes)
        values = self.fmt.decode(codes, _work_dtype(dtype))
        return _from_code_domain(values, scale, zero_point).to(dtype)

    def _fake(self, x: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
        """fmt.round in the code domain, back to values; scale and zero_point broadcast against x."""
        return _from_code_domain(self.fmt.round(_to_code_domain(x, scale, zero_point)), scale,
                                 zero_point)

    def _scale_for(self, x: Tensor) -> tuple[Tensor, Tensor | None]:
        """(scale, zero_point) in the stored shape for x: computed from x when dynamic."""
        if self.spec.dynamic:
            with torch.no_grad():
                v, shape = self._granules(x, per_row=True)
                lo, hi = self._minmax(v)
            if self.spec.learnable:
                # clamped in value only: at clip = 1 a plain clamp would pass no gradient
                clip = _Identity.apply(self.clip, self.clip.detach().clamp(CLIP_MIN, 1.0), 1.0)
                lo, hi = None if lo is None else lo * clip, hi * clip
            scale, zero_point = self._qparams(lo, hi)
            return self._two_level(scale.reshape(shape)), None if zero_point is None else zero_point.reshape(shape)
        if not self.calibrated:
            raise RuntimeError("this static quantizer is not calibrated: call observe(x) on "
                               "calibration batches and then finalize() (or fit(w) for a weight), "
                               "or pass calib=... to vqz.quantize")
        self._check_scale_shape(x)
        return self.scale, getattr(self, "zero_point", None)

    def _qparams(self, lo: Tensor | None, hi: Tensor) -> tuple[Tensor, Tensor | None]:
        """Scale and zero point [C] (float32) mapping [lo, hi] onto the format; lo None: symmetric
        with hi = max|x|."""
        # Times the reciprocal, not divided: torch's CUDA division by a Python number multiplies
        # by its reciprocal, so this gives the same scales on every device and in the kernels.
        if lo is None:
            return (hi.clamp(min=_RANGE_FLOOR) * (1.0 / self.fmt.max_value)).float(), None
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)  # the range holds 0, so 0 stays exact
        scale = ((hi - lo).clamp(min=_RANGE_FLOOR) * (1.0 / self.fmt.qmax)).float()
        return scale, (-lo / scale).round().clamp(0, self.fmt.qmax).float()

    def _two_level(self, scale: Tensor) -> Tensor:
        """Group scales [..., G] rounded up to integer multiples 1..L of their row's unit (max / L);
        unchanged unless the spec asks for two-level scales."""
        levels = self.spec.int_group_scales
        if not levels:
            return scale
        unit = scale.amax(-1, keepdim=True) / levels
        return unit * torch.ceil(scale / unit).clamp(1, levels)

    def _minmax(self, v: Tensor) -> tuple[Tensor | None, Tensor]:
        """Per-granule (min, max) of v [C, M]; symmetric: (None, max|v|)."""
        if self.spec.symmetric:
            return None, v.abs().amax(1)
        return tuple(v.aminmax(dim=1))

    # ---- layout ------------------------------------------------------------------------------

    def _granules(self, x: Tensor, per_row: bool) -> tuple[Tensor, tuple]:
        """x [..., K] as float32 [C, M], one row per scale, and the stored scale shape.
        per_row: group scales per row of x ([..., G]) instead of shared by all rows ([G])."""
        v = x.detach().float()
        k = x.shape[-1]
        granularity = self.spec.granularity
        if granularity == "tensor":
            return v.reshape(1, -1), ()
        if granularity == "channel":
            axis = self._axis(x)
            return v.movedim(axis, 0).reshape(x.shape[axis], -1), (x.shape[axis],)
        if granularity == "token":
            return v.reshape(-1, k), (*x.shape[:-1], 1)
        g = self.spec.group_size
        n_groups = -(-k // g)
        v = F.pad(v, (0, n_groups * g - k))
        if per_row:
            return v.reshape(-1, g), (*x.shape[:-1], n_groups)
        return v.reshape(-1, n_groups, g).transpose(0, 1).reshape(n_groups, -1), (n_groups,)

    def _expand(self, t: Tensor | None, x: Tensor) -> Tensor | None:
        """t in the stored scale shape -> broadcastable against x [..., K]."""
        if t is None:
            return None
        if self.spec.granularity == "channel":
            shape = [1] * x.dim()
            shape[self._axis(x)] = -1
            return t.reshape(shape)
        if self.spec.granularity == "group":
            return t.repeat_interleave(self.spec.group_size, -1)[..., :x.shape[-1]]
        return t

    def _axis(self, x: Tensor) -> int:
        axis = self.spec.axis
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"channel axis {axis} is out of range for an input of shape "
                             f"{tuple(x.shape)}")
        return axis % x.dim()

    def _check_scale_shape(self, x: Tensor) -> None:
        have = tuple(self.scale.shape)
        if self.spec.granularity == "channel":
            fits = have == (x.shape[self._axis(x)],)
        elif self.spec.granularity == "group":
            n_groups = -(-x.shape[-1] // self.spec.group_size)
            fits = have in ((n_groups,), (*x.shape[:-1], n_groups))
        else:
            fits = True
        if not fits:
            raise ValueError(f"this quantizer was calibrated with scales of shape {have} "
                             f"({self.spec.granularity} granularity), which do not fit an input "
                             f"of shape {tuple(x.shape)}")

    @staticmethod
    def _check_float(x: Tensor) -> None:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"Quantizer expects a floating-point tensor, got {got}")

    def extra_repr(self) -> str:
        s = self.spec
        parts = [s.format]
        if s.granularity == "group":
            parts.append(f"group={s.group_size}")
        elif s.granularity == "channel":
            parts.append(f"channel(axis={s.axis})")
        else:
            parts.append(s.granularity)
        parts.append("sym" if s.symmetric else "asym")
        if s.dynamic:
            parts.append("dynamic")
        else:
            observer = f"percentile({s.percentile})" if s.observer == "percentile" else s.observer
            parts.append(f"static={observer}")
        if s.learnable:
            parts.append("learnable")
        return ", ".join(parts)
