"""Number formats for quantization: integers, minifloats (FP4/FP6/FP8), NF4, logarithmic codes and
microscaling block formats (MXFP4, NVFP4), plus packing of codes for storage.

Element formats work on values already divided by their scale (the quantizer owns the scales):
`encode` maps values to integer codes of the same shape, `decode` maps codes back to values and
`round` equals decode(encode(x)), computed in float32 and returned in x's dtype (fake quantization).
Block formats carry their own per-block scales and quantize along the last dim.

Formats are immutable and compare and hash by `name`; `get_format(name)` returns one shared object
per name.
"""
from __future__ import annotations

import functools
import math
import re
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


def _pow2(e: Tensor) -> Tensor:
    """Exactly 2.0 ** e as float32 for an integer tensor e >= -1022 (0 below 2^-149).

    Built from the float64 bit pattern, so it does not depend on the accuracy of exp2/pow.
    """
    return ((e.long() + 1023) << 52).view(torch.float64).float()


def _check_bits(what: str, bits: int, lo: int, hi: int) -> None:
    if not isinstance(bits, int) or not lo <= bits <= hi:
        raise ValueError(f"{what} take {lo}..{hi} bits, got {bits!r}")


class Format:
    """A number format. Subclasses pass their attributes to __init__; instances are immutable."""

    name: str
    bits: int
    max_value: float  # largest representable magnitude: a quantizer maps absmax to it
    min_value: float  # most negative representable value (0.0 for unsigned formats)
    block_size: int | None = None  # element formats: None

    def __init__(self, **attrs):
        self.__dict__.update(attrs, _device_cache={})

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable")

    def __eq__(self, other):
        return isinstance(other, Format) and other.name == self.name

    def __hash__(self):
        return hash(self.name)

    def __repr__(self):
        return f"{type(self).__name__}({self.name!r})"

    def __copy__(self):  # immutable: copies (e.g. of a module holding a format) share it
        return self

    def __deepcopy__(self, memo):
        return self

    def encode(self, x: Tensor) -> Tensor:
        """Codes for x, same shape as x."""
        raise NotImplementedError

    def decode(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Values of `codes`, same shape, in `dtype`."""
        raise NotImplementedError

    def round(self, x: Tensor) -> Tensor:
        """x rounded to the format (decode(encode(x))), in x's dtype."""
        return self.decode(self.encode(x), dtype=x.dtype)

    def _on(self, attr: str, device: torch.device) -> Tensor:
        """The CPU tensor attribute `attr` on `device` (copied once, then cached)."""
        if torch.compiler.is_compiling():
            # A graph guards on the cache's keys, and filling the cache from inside the first
            # compiled call would fail that guard and recompile: copy in the graph instead.
            return getattr(self, attr).to(device)
        key = (attr, device)
        if key not in self._device_cache:
            self._device_cache[key] = getattr(self, attr).to(device)
        return self._device_cache[key]


class IntFormat(Format):
    """Integers. Signed: int8 codes in [-2^(b-1), 2^(b-1)-1]. Unsigned (for asymmetric quantizers,
    which add the zero point before encoding): uint8 codes in [0, 2^b-1].

    encode rounds half to even and saturates to [qmin, qmax]; NaN encodes to qmax (as in the FP
    formats without a NaN code).
    """

    def __init__(self, bits: int, signed: bool = True):
        _check_bits("INT formats", bits, 2, 8)
        qmin, qmax = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)
        super().__init__(name=("int" if signed else "uint") + str(bits), bits=bits, signed=signed,
                         qmin=qmin, qmax=qmax, max_value=float(qmax), min_value=float(qmin))

    def encode(self, x: Tensor) -> Tensor:
        return self._round_f32(x).to(torch.int8 if self.signed else torch.uint8)

    def decode(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return codes.to(dtype)

    def round(self, x: Tensor) -> Tensor:
        return self._round_f32(x).to(x.dtype)

    def _round_f32(self, x: Tensor) -> Tensor:
        return torch.round(x.float()).nan_to_num(nan=self.max_value).clamp(self.qmin, self.qmax)


# (exp_bits, man_bits) -> the NaN/inf convention `get_format` uses and that keeps the plain name
_STANDARD_NAN_INF = {(4, 3): "fn", (5, 2): "ieee"}


class FPFormat(Format):
    """Minifloat: 1 sign, E exponent and M mantissa bits, bias 2^(E-1)-1, subnormals when the
    exponent field is 0. Codes are uint8 bit patterns sign<<(E+M) | exponent<<M | mantissa.

    nan_inf: "none": every code is finite (OCP MX element formats E2M1, E2M3, E3M2);
        "fn": no infinities, only the all-ones exponent+mantissa pattern is NaN (E4M3: max 448);
        "ieee": the all-ones exponent is inf (mantissa 0) or NaN (E5M2: max 57344).
    encode rounds to nearest with ties to even mantissa (for M = 0 a tie between two powers of two
    goes up) and saturates to +-max_value, +-inf included. NaN encodes to the pattern with all bits
    but the sign set: NaN for "fn"/"ieee", +max_value for "none". -0.0 and negatives that round to
    0 encode to the sign-bit code (-0.0).
    `values` (float32 [2^bits]) holds the decoded value of every code.
    """

    def __init__(self, exp_bits: int, man_bits: int, *, nan_inf: str = "none"):
        e, m = exp_bits, man_bits
        if not (isinstance(e, int) and isinstance(m, int) and e >= 1 and m >= 0
                and 3 <= 1 + e + m <= 8):
            raise ValueError(f"FP formats take 3..8 bits in total (1 sign + E exponent + "
                             f"M mantissa) with at least 1 exponent bit, got e{e}m{m}")
        if nan_inf not in ("none", "fn", "ieee"):
            raise ValueError(f"nan_inf must be 'none', 'fn' or 'ieee', got {nan_inf!r}")
        if nan_inf == "ieee" and (e < 2 or m < 1):
            raise ValueError("nan_inf='ieee' needs at least 2 exponent bits and 1 mantissa bit")
        half = 2 ** (e + m)  # codes below `half` have the sign bit clear
        bias = 2 ** (e - 1) - 1
        codes = torch.arange(2 * half)
        man, exp = codes % 2**m, (codes >> m) % 2**e
        mag = torch.where(exp == 0, man, man + 2**m) * _pow2(exp.clamp(min=1) - bias - m)
        if nan_inf == "fn":
            mag = torch.where(codes % half == half - 1, math.nan, mag)
        elif nan_inf == "ieee":
            mag = torch.where(exp == 2**e - 1, torch.where(man == 0, math.inf, math.nan), mag)
        values = torch.where(codes >= half, -mag, mag)
        n_finite = int(values[:half].isfinite().sum())  # non-finite codes top each half
        max_value = float(values[n_finite - 1])
        suffix = "" if nan_inf == _STANDARD_NAN_INF.get((e, m), "none") else f"_{nan_inf}"
        super().__init__(name=f"e{e}m{m}{suffix}", bits=1 + e + m, exp_bits=e, man_bits=m,
                         nan_inf=nan_inf, bias=bias, values=values, max_value=max_value,
                         min_value=-max_value, _grid=values[:n_finite], _half=half,
                         _nan_value=float(values[half - 1]), _emin=1 - bias)

    def encode(self, x: Tensor) -> Tensor:
        xf = x.float()
        # The rounded magnitude is exactly on the grid of non-negative values, sorted by code.
        codes = torch.searchsorted(self._on("_grid", x.device), self._round_abs(xf.abs()))
        codes = codes + xf.signbit() * self._half
        return torch.where(xf.isnan(), self._half - 1, codes).to(torch.uint8)

    def decode(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._on("values", codes.device)[codes.long()].to(dtype)

    def round(self, x: Tensor) -> Tensor:
        xf = x.float()
        r = torch.copysign(self._round_abs(xf.abs()), xf)
        return torch.where(xf.isnan(), self._nan_value, r).to(x.dtype)

    def _round_abs(self, a: Tensor) -> Tensor:
        """Magnitudes a >= 0 (float32) rounded to the nearest representable value, saturated."""
        a = a.clamp(max=self.max_value)
        _, e = torch.frexp(a)  # a = f * 2^e with f in [0.5, 1)
        # Grid spacing at a; below the normal range it stays at the subnormal spacing.
        quantum = _pow2((e - 1).clamp(min=self._emin) - self.man_bits)
        return torch.round(a / quantum) * quantum


_NF4_VALUES = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)


class NF4Format(Format):
    """NormalFloat-4 (QLoRA): 16 values in [-1, 1], including exact -1, 0 and 1.

    Codes are uint8 indices 0..15 into the sorted table `values` (float32 [16]). encode picks the
    nearest value, saturating; an x exactly at the (float32) midpoint of two neighbours goes to the
    lower index; NaN encodes to 15 (+1.0).
    """

    def __init__(self):
        values = torch.tensor(_NF4_VALUES, dtype=torch.float32)
        super().__init__(name="nf4", bits=4, max_value=1.0, min_value=-1.0, values=values,
                         _midpoints=(values[1:] + values[:-1]) / 2)

    def encode(self, x: Tensor) -> Tensor:
        xf = x.float().nan_to_num(nan=self.max_value)
        return torch.searchsorted(self._on("_midpoints", x.device), xf).to(torch.uint8)

    def decode(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return self._on("values", codes.device)[codes.long()].to(dtype)


class LogFormat(Format):
    """Logarithmic codes for non-negative inputs such as post-Softmax probabilities (x already
    divided by its scale, so typically in [0, 1]). uint8 codes, rounding in the log domain.

    base "2": q = round(-log2 x), value 2^-q. base "sqrt2": q = round(-2 log2 x), value 2^(-q/2),
    decoded in the shift-and-multiply form of RepQ-ViT, 2^-ceil(q/2) * (1 + (q mod 2)(sqrt(2)-1)).
    x > 1 saturates to code 0 (1.0). The top code 2^bits-1 stands for 0: x <= 0 (negative inputs
    count as 0) and any x whose q would exceed 2^bits-2 encode to it. NaN encodes to code 0
    (+max_value, as in the FP formats). Codes 150..254 of "log2:8" lie below float32's smallest
    subnormal: they decode to 0 and encode never produces them.
    """

    def __init__(self, bits: int, base: str = "2"):
        _check_bits("log formats", bits, 2, 8)
        if base not in ("2", "sqrt2"):
            raise ValueError(f"log formats take base '2' or 'sqrt2', got {base!r}")
        super().__init__(name=f"log{base}:{bits}", bits=bits, base=base, max_value=1.0,
                         min_value=0.0, zero_code=2**bits - 1, _steps=1 if base == "2" else 2)

    def encode(self, x: Tensor) -> Tensor:
        xf = x.float()
        q = torch.round(-self._steps * torch.log2(xf)).clamp(min=0)
        zero = (xf <= 0) | (q >= self.zero_code)
        return torch.where(zero, self.zero_code, q.nan_to_num(nan=0.0)).to(torch.uint8)

    def decode(self, codes: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        q = codes.long()
        if self.base == "2":
            v = _pow2(-q)
        else:
            v = _pow2(-((q + 1) // 2)) * (1 + (q % 2) * (math.sqrt(2) - 1))
        return torch.where(q == self.zero_code, 0.0, v).to(dtype)


class BlockCodes(NamedTuple):
    """A tensor [..., K] in a block format."""

    codes: Tensor  # uint8 [..., K], element codes
    scales: Tensor  # uint8 [..., ceil(K / block_size)], codes of the block scales
    tensor_scale: Tensor | None  # float32 0-dim, or None when the format has none


_BLOCK_NAMES = {("e2m1", 32, "e8m0", False): "mxfp4", ("e2m1", 16, "e4m3", True): "nvfp4"}


class BlockFormat(Format):
    """Microscaling: elements of format `elem` share one scale per `block_size` run of the last dim
    (a last partial block is zero-padded internally, so any K works). Elements are
    elem.encode(x / block scale), saturating; decode is element value * block scale.

    scale_format "e8m0" (OCP MX): the block scale is 2^e, e = floor(log2 amax_block) - emax(elem)
        clamped to [-127, 127] and stored as e + 127. An all-zero block gets code 0 (2^-127); a
        block holding NaN gets code 255 (NaN) and decodes to NaN.
    scale_format "e4m3" (NVFP4): the block scale is amax_block / elem.max_value / tensor_scale
        rounded to E4M3 (RNE, saturating), times tensor_scale. With `tensor_scale` a per-tensor
        float32 scale amax(|x|) / (448 * elem.max_value) (1.0 for an all-zero x) keeps block scales
        within E4M3's range. A block scale that rounds to 0 gives zero elements. Expects finite
        inputs (a NaN anywhere makes the whole tensor NaN).
    """

    def __init__(self, elem: FPFormat, block_size: int, scale_format: str,
                 tensor_scale: bool):
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        if scale_format not in ("e8m0", "e4m3"):
            raise ValueError(f"scale_format must be 'e8m0' or 'e4m3', got {scale_format!r}")
        if tensor_scale and scale_format != "e4m3":
            raise ValueError("a per-tensor scale is only supported with e4m3 block scales")
        key = (elem.name, block_size, scale_format, tensor_scale)
        name = _BLOCK_NAMES.get(
            key, f"{elem.name}_b{block_size}_{scale_format}" + ("_ts" if tensor_scale else ""))
        super().__init__(name=name, bits=elem.bits, block_size=block_size, elem=elem,
                         scale_format=scale_format, tensor_scale=tensor_scale,
                         max_value=elem.max_value, min_value=elem.min_value,
                         _elem_emax=math.floor(math.log2(elem.max_value)))

    def encode(self, x: Tensor) -> BlockCodes:
        """x [..., K] -> BlockCodes(codes [..., K], scales [..., ceil(K / block_size)],
        tensor_scale)."""
        xf = x.float()
        blocks = self._blocks(xf)
        amax = blocks.abs().amax(-1)
        ts = None
        if self.tensor_scale:
            ts = self.tensor_scale_of(xf.abs().amax())
        if self.scale_format == "e8m0":
            # frexp's exponent of inf is unspecified, so clamp to the largest float first
            _, e = torch.frexp(amax.clamp(max=torch.finfo(torch.float32).max))
            e = torch.where(amax > 0, e - 1 - self._elem_emax, -127).clamp(-127, 127)
            scales = torch.where(amax.isnan(), 255, e + 127).to(torch.uint8)
        else:
            target = _divide(amax, self.elem.max_value)
            scales = E4M3.encode(target if ts is None else target / ts)
        s = self._scale_values(scales, ts)[..., None]
        codes = self.elem.encode(torch.where(s > 0, blocks / s, 0.0))
        return BlockCodes(codes.flatten(-2)[..., : x.shape[-1]], scales, ts)

    def tensor_scale_of(self, amax: Tensor) -> Tensor:
        """The per-tensor scale (e4m3 block scales) of a tensor whose largest |x| is `amax`
        (float32, 0-dim)."""
        return torch.where(amax > 0, _divide(amax, E4M3.max_value * self.elem.max_value), 1.0)

    def decode(self, bc: BlockCodes, dtype: torch.dtype = torch.float32) -> Tensor:
        """BlockCodes -> values [..., K] in `dtype`."""
        s = self._scale_values(bc.scales, bc.tensor_scale)[..., None]
        values = self._blocks(self.elem.decode(bc.codes)) * s
        return values.flatten(-2)[..., : bc.codes.shape[-1]].to(dtype)

    def _blocks(self, x: Tensor) -> Tensor:
        """[..., K] -> [..., ceil(K / block_size), block_size], zero-padded."""
        return F.pad(x, (0, -x.shape[-1] % self.block_size)).unflatten(-1, (-1, self.block_size))

    def _scale_values(self, scales: Tensor, ts: Tensor | None) -> Tensor:
        """Block scale codes -> float32 block scales, the tensor scale included."""
        if self.scale_format == "e8m0":
            q = scales.long()
            return torch.where(q == 255, math.nan, _pow2(q - 127))
        s = E4M3.decode(scales)
        return s if ts is None else s * ts


def _divide(x: Tensor, value: float) -> Tensor:
    """x / value correctly rounded on every device: CUDA divides by a Python number through its
    reciprocal, which may differ in the last bit, so the divisor is made a tensor there."""
    return x / (torch.full((), value, device=x.device) if x.is_cuda else value)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack int8/uint8 codes [..., K] of a `bits`-bit format into uint8 for storage.

    bits <= 4: two codes per byte, the even index in the low nibble (signed codes as 4-bit two's
    complement), an odd K padded with a zero nibble: [..., ceil(K / 2)].
    bits 5..8: the code bytes unchanged (int8 viewed as uint8): [..., K].
    """
    _check_bits("packed codes", bits, 1, 8)
    if codes.dtype not in (torch.int8, torch.uint8):
        raise TypeError(f"pack_codes takes int8 or uint8 codes, got {codes.dtype}")
    u = codes.view(torch.uint8)
    if bits > 4:
        return u
    u = F.pad(u & 0xF, (0, u.shape[-1] % 2))
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_codes(packed: Tensor, bits: int, length: int, signed: bool) -> Tensor:
    """Inverse of `pack_codes`: uint8 [..., ceil(length / 2)] (bits <= 4) or [..., length]
    -> codes [..., length], int8 if `signed` else uint8."""
    _check_bits("packed codes", bits, 1, 8)
    if bits > 4:
        u = packed[..., :length]
    else:
        u = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)[..., :length]
        if signed:
            return (u ^ 8).view(torch.int8) - 8  # sign-extend the 4-bit two's complement nibble
    return u.view(torch.int8) if signed else u


_ALIASES = {"fp8": "e4m3", "fp4": "e2m1"}
_ACCEPTED = ("int2..int8, uint2..uint8, e2m1 (fp4), e2m3, e3m2, e4m3 (fp8), e5m2, other e{E}m{M}, "
             "nf4, mxfp4, nvfp4, log2:B, logsqrt2:B")


def get_format(name: str) -> Format:
    """The format called `name` (case-insensitive; the accepted names are listed in `_ACCEPTED`).

    Returns the same object for the same name. Raises ValueError for unknown names and for bit
    widths out of range.
    """
    key = name.lower()
    return _build(_ALIASES.get(key, key))


@functools.lru_cache(maxsize=None)
def _build(name: str) -> Format:
    if name == "nf4":
        return NF4Format()
    if name == "mxfp4":
        return BlockFormat(_build("e2m1"), 32, "e8m0", False)
    if name == "nvfp4":
        return BlockFormat(_build("e2m1"), 16, "e4m3", True)
    if match := re.fullmatch(r"(u?)int(\d+)", name):
        return IntFormat(int(match[2]), signed=not match[1])
    if match := re.fullmatch(r"e(\d+)m(\d+)", name):
        e, m = int(match[1]), int(match[2])
        return FPFormat(e, m, nan_inf=_STANDARD_NAN_INF.get((e, m), "none"))
    if match := re.fullmatch(r"log(2|sqrt2):(\d+)", name):
        return LogFormat(int(match[2]), base=match[1])
    raise ValueError(f"unknown format {name!r}; accepted: {_ACCEPTED}")


E2M1 = get_format("e2m1")
E2M3 = get_format("e2m3")
E3M2 = get_format("e3m2")
E4M3 = get_format("e4m3")
E5M2 = get_format("e5m2")
NF4 = get_format("nf4")
MXFP4 = get_format("mxfp4")
NVFP4 = get_format("nvfp4")
