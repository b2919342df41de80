"""Quantization configs: what format each layer's weights and activations get.

`QuantSpec` describes one quantizer (format, granularity, scale source, observer); `QuantConfig`
is a whole recipe (weight and activation specs, low-rank branch, smoothing, layer rules) and is what
the presets are. Both are validated on construction and round-trip through JSON.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from dataclasses import dataclass, field, fields, replace

from . import formats

CONFIG_VERSION = 1
GRANULARITIES = ("tensor", "channel", "token", "group")
OBSERVERS = ("minmax", "percentile", "mse")
SUPPORTED_LAYER_TYPES = ("Linear", "Conv2d", "Attention")


@dataclass(frozen=True)
class QuantSpec:
    """One quantizer.

    format: a name `formats.get_format` knows ("int8", "int4", "e4m3", "e2m1", "nf4", "nvfp4", ...).
    granularity: "tensor" (one scale), "channel" (one per index along `axis`), "token" (one per row,
        reducing over the last dim; dynamic only) or "group" (one per `group_size` run of the last
        dim; a last partial group is padded with zeros, so any channel count works).
    symmetric: zero point fixed at 0; False gives an asymmetric integer range (INT formats only).
    dynamic: scales computed from each input on the fly instead of calibrated once.
    observer: how static scales are chosen: "minmax", "percentile" (of |x|) or "mse" (Lp-error
        grid search over clipping ratios, p = `lp`).
    learnable: for QAT: static scale and offset become trainable parameters (LSQ+); a dynamic
        spec gets a trainable clip ratio (0.05..1) on the range of each input.
    int_group_scales: 0, or L (a power of two) for two-level group scales: each row's group scales
        are integers 1..L times one fp32 scale per row, so `code * group multiplier` fits int8 and
        the GPU kernels run a plain INT8 GEMM with all fp work in the epilogue (DESIGN §4). Group
        scales are rounded up to the next multiple, so nothing is clipped that fp scales keep.
    """

    format: str = "int8"
    granularity: str = "tensor"
    group_size: int | None = None
    symmetric: bool = True
    dynamic: bool = False
    observer: str = "minmax"
    percentile: float = 99.99
    lp: float = 2.0
    axis: int = 0
    learnable: bool = False
    int_group_scales: int = 0

    def __post_init__(self):
        fmt = formats.get_format(self.format)  # raises ValueError for unknown names and bad bits
        object.__setattr__(self, "_fmt", fmt)  # looked up once: torch.compile traces `fmt` cheaply
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity {self.granularity!r} is not one of {GRANULARITIES}")
        block = getattr(fmt, "block_size", None)
        if block is not None:
            if self.granularity == "tensor" and self.group_size is None:
                object.__setattr__(self, "granularity", "group")
            if self.granularity != "group" or self.group_size not in (None, block):
                raise ValueError(
                    f"{self.format} is a block format with blocks of {block}; use "
                    f"granularity='group' and group_size={block} (or leave both unset)")
            object.__setattr__(self, "group_size", block)
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) \
                    or self.group_size < 1:
                raise ValueError(
                    f"granularity='group' needs a positive integer group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise ValueError(f"group_size is only used with granularity='group' "
                             f"(got granularity={self.granularity!r}); drop it or switch to 'group'")
        if self.granularity == "token" and not self.dynamic:
            raise ValueError("granularity='token' needs dynamic=True: the number of tokens changes "
                             "from input to input, so per-token scales cannot be calibrated once")
        if self.observer not in OBSERVERS:
            raise ValueError(f"observer {self.observer!r} is not one of {OBSERVERS}")
        if not 0.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.lp <= 0:
            raise ValueError(f"lp must be positive, got {self.lp}")
        if not self.symmetric and not isinstance(fmt, formats.IntFormat):
            raise ValueError(f"asymmetric quantization needs an INT format, {self.format} is not one")
        if self.int_group_scales:
            self._check_int_group_scales(fmt)

    def _check_int_group_scales(self, fmt) -> None:
        levels = self.int_group_scales
        if not isinstance(levels, int) or levels < 2 or levels & (levels - 1):
            raise ValueError(f"int_group_scales must be 0 or a power of two >= 2, got {levels!r}")
        if self.granularity != "group" or not isinstance(fmt, formats.IntFormat) \
                or not self.symmetric or self.learnable:
            raise ValueError("int_group_scales needs a symmetric INT format with "
                             "granularity='group' and learnable=False")
        if -fmt.qmin * levels > 128:
            raise ValueError(f"int_group_scales={levels} with {self.format} codes down to {fmt.qmin} "
                             f"overflows int8; use at most {128 // -fmt.qmin}")

    @property
    def fmt(self):
        return self._fmt

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> QuantSpec:
        return cls(**_known_keys(cls, d))


@dataclass(frozen=True)
class AttnSpec:
    """Quantization of an attention module's two activation products (q @ kᵀ and attn @ v).

    operands: the spec of q, k and v (each quantized along the product's reduction dim).
    probs: the spec of the softmax probabilities: a static, per-tensor log format ("logsqrt2:B"
        during calibration, which inference runs as two log2 parts; or "log2:B").
    """

    operands: QuantSpec
    probs: QuantSpec

    def __post_init__(self):
        for name in ("operands", "probs"):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, QuantSpec.from_dict(value))
        if not isinstance(self.probs.fmt, formats.LogFormat) or self.probs.dynamic \
                or self.probs.granularity != "tensor":
            raise ValueError(f"attention probabilities need a static per-tensor log format "
                             f"('log2:B' or 'logsqrt2:B'), got {self.probs}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LayerRule:
    """Changes the recipe of the layers it selects. Later rules win over earlier ones.

    pattern: glob on the module's qualified name ("*attn*", "blocks.0.*").
    types: module class names ("Linear", "Conv2d"); empty matches any.
    skip: True keeps the selected layers in full precision, False quantizes them even where an
        earlier rule (a family adapter's default exclusion, say) skipped them; None changes nothing.
    weight/act: replacement specs (act=None with `no_act=True` keeps activations in full precision).
    rank: low-rank branch rank for these layers. smooth: per-input-channel smoothing on (True) or
    off (False) for these Linear layers; None keeps the config's.
    """

    pattern: str = "*"
    types: tuple = ()
    skip: bool | None = None
    weight: QuantSpec | None = None
    act: QuantSpec | None = None
    no_act: bool = False
    rank: int | None = None
    smooth: bool | None = None

    def __post_init__(self):
        object.__setattr__(self, "types", tuple(self.types))
        bad = [t for t in self.types if t not in SUPPORTED_LAYER_TYPES]
        if bad:
            raise ValueError(f"rule types {bad} cannot be quantized; supported layer types are "
                             f"{SUPPORTED_LAYER_TYPES}")
        for name in ("weight", "act"):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, QuantSpec.from_dict(value))
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")

    def matches(self, name: str, type_name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern) and (not self.types or type_name in self.types)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["types"] = list(self.types)
        return d


@dataclass(frozen=True)
class QuantConfig:
    """A whole quantization recipe.

    weight/act: the default specs (act=None: weight-only).
    rank: rank of the 16-bit low-rank branch (0: none). smooth: per-input-channel smoothing
    (alpha=None searches alpha per layer). gptq: GPTQ on the (residual) weights.
    keep_branch: for QAT (vqz.train_qat) only: the branch is SVDQuant's (on the unquantized input
    x̂, initialised from the SVD of the smoothed weight, whose residual is quantized), trained and
    kept at inference, instead of an auxiliary branch on the quantized input that training decays
    to rank 0. (Post-training quantization always keeps its branch.)
    exclude: globs of module names kept in full precision. rules: per-layer changes.
    split_shortcut: give convolutions that consume a UNet skip concatenation one activation and
    weight quantizer per half (where the model's adapter finds such layers).
    timestep_buckets: static activation scales per range of the denoiser's timestep (B ranges with
    equally many calibration timesteps; 0 or 1: one range). Needs a `timestep` argument.
    attn: quantize the activation products of the attention modules the model's adapter knows
    (timm ViT); None leaves them in full precision (their qkv/proj Linear layers are still quantized).
    repq: fold per-channel ranges of post-LayerNorm activations into the LayerNorm and its
    consumers (RepQ-ViT), where the adapter names such pairs and the consumers' activations are
    static; needs calibration data.
    polish, compensate, reconstruct (QuartDepth; Linear layers with quantized activations; need
    calibration data): `polish` quantizes activations in a log domain with a per-channel offset α;
    `compensate` refits each weight to the layer's fp output from its quantized input (damped
    least squares) and rounds it with GPTQ; `reconstruct` > 0 learns the weights' rounding
    (AdaRound) for that many steps per block against the block's fp output (blocks named by the
    model's adapter).
    rotate: rotate the input of every Linear layer with dynamic activations and K a multiple of 64
    by a block-diagonal Hadamard matrix (blocks of 64), the weight rotated to match (after
    smoothing, vqz/nn/rotation.py): outlier channels are spread over their block before 4-bit
    rounding. The activation kernels rotate in registers, with the same codes.
    """

    name: str = "custom"
    weight: QuantSpec | None = field(default_factory=lambda: QuantSpec("int8", "channel"))
    act: QuantSpec | None = None
    rank: int = 0
    keep_branch: bool = False
    smooth: bool = False
    alpha: float | None = None
    gptq: bool = False
    svd_iters: int = 1
    split_shortcut: bool = True
    timestep_buckets: int = 0
    repq: bool = False
    attn: AttnSpec | None = None
    polish: bool = False
    compensate: bool = False
    reconstruct: int = 0
    rotate: bool = False
    exclude: tuple = ()
    rules: tuple = ()
    version: int = CONFIG_VERSION

    def __post_init__(self):
        for name in ("weight", "act"):
            value = getattr(self, name)
            if isinstance(value, dict):
                object.__setattr__(self, name, QuantSpec.from_dict(value))
        if isinstance(self.attn, dict):
            object.__setattr__(self, "attn", AttnSpec(**self.attn))
        object.__setattr__(self, "exclude", tuple(self.exclude))
        object.__setattr__(self, "rules", tuple(
            LayerRule(**r) if isinstance(r, dict) else r for r in self.rules))
        if self.version > CONFIG_VERSION:
            raise ValueError(f"config version {self.version} is newer than this vqz understands "
                             f"({CONFIG_VERSION}); upgrade vqz")
        if self.weight is None and self.act is None:
            raise ValueError("a config needs a weight spec, an activation spec, or both")
        if self.weight is not None and self.weight.granularity == "token":
            raise ValueError("weights cannot use granularity='token'; use 'channel' or 'group'")
        if not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"rank must be an integer >= 0, got {self.rank!r}")
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if not isinstance(self.timestep_buckets, int) or self.timestep_buckets < 0:
            raise ValueError(f"timestep_buckets must be an integer >= 0, got {self.timestep_buckets!r}")
        if self.svd_iters < 1:
            raise ValueError(f"svd_iters must be >= 1, got {self.svd_iters}")
        if self.rank and self.weight is None:
            raise ValueError("a low-rank branch (rank > 0) needs a weight spec")
        if not isinstance(self.reconstruct, int) or self.reconstruct < 0:
            raise ValueError(f"reconstruct must be an integer >= 0 (steps), got {self.reconstruct!r}")
        if self.rotate and (self.weight is None or self.act is None or not self.act.dynamic):
            raise ValueError("rotate=True rotates the weights and the inputs whose activations are "
                             "quantized on the fly; give the config a weight spec and a dynamic act "
                             "spec (dynamic=True)")
        if self.rotate and (self.polish or self.compensate or self.reconstruct):
            raise ValueError("rotate cannot be combined with polish, compensate or reconstruct")
        if (self.polish or self.compensate or self.reconstruct) and self.act is None:
            raise ValueError("polish, compensate and reconstruct work on quantized activations; "
                             "give the config an act spec")

    @property
    def needs_calibration(self) -> bool:
        """True when some activation scales are static (must be calibrated) or an algorithm needs
        activation statistics (smoothing with alpha search, GPTQ)."""
        specs = [self.act] + [r.act for r in self.rules if r.skip is not True]
        return any(s is not None and not s.dynamic for s in specs) or self.smooth or self.gptq \
            or self.attn is not None \
            or self.polish or self.compensate or bool(self.reconstruct)  # need input statistics

    def with_overrides(self, **overrides) -> QuantConfig:
        """A copy with fields changed. `group_size=g` sets the group size of every group-wise spec."""
        group_size = overrides.pop("group_size", None)
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown config override(s) {unknown}; valid ones are "
                             f"{sorted(known | {'group_size'})}")
        cfg = replace(self, **overrides)
        if group_size is not None:
            cfg = replace(cfg, weight=_regroup(cfg.weight, group_size), act=_regroup(cfg.act, group_size))
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["exclude"] = list(self.exclude)
        d["rules"] = [r.to_dict() for r in self.rules]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        return cls(**_known_keys(cls, d))


def _regroup(spec: QuantSpec | None, group_size: int) -> QuantSpec | None:
    if spec is None or spec.granularity != "group":
        return spec
    if getattr(spec.fmt, "block_size", None) is not None:
        raise ValueError(f"{spec.format} has a fixed block size of {spec.fmt.block_size}; "
                         f"group_size cannot change it")
    return replace(spec, group_size=group_size)


def _known_keys(cls, d: dict) -> dict:
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; valid fields are {sorted(known)}")
    return dict(d)


def _int_w(bits, group=None, observer="mse"):
    if group is None:
        return QuantSpec(f"int{bits}", "channel", observer=observer)
    return QuantSpec(f"int{bits}", "group", group, observer=observer)


def _dyn_a(fmt, group=None, symmetric=True):
    if group is None:
        return QuantSpec(fmt, "token", dynamic=True, symmetric=symmetric)
    return QuantSpec(fmt, "group", group, dynamic=True, symmetric=symmetric)


# Asymmetric per-token INT8 activations: post-GELU/SiLU inputs are one-sided, and the zero point
# costs a GEMM only a per-row correction in its epilogue (zero_point * column sums of W).
_A8 = _dyn_a("int8", symmetric=False)


def _vit(bits: int) -> QuantConfig:
    """RepQ-ViT-style W/A recipe for timm ViTs: static per-tensor activations (fixed scales are what
    integer ViT kernels consume, and the RepQ post-LayerNorm reparameterization targets them);
    asymmetric for Linear inputs (post-GELU fc2 inputs are one-sided), symmetric for q, k, v.
    The softmax scale is MSE-searched below the calibrated max: log codes are only ±19% apart, and
    shifting the grid onto where the probabilities lie gained ~8 dB on a small ViT over min-max.
    At 4 bits the post-GELU fc2 input gets per-channel ranges, folded into fc2's weight columns
    (smoothing, α searched): on the reference ViT its per-tensor quantization alone cost 3 points."""
    return QuantConfig(
        f"vit-w{bits}a{bits}", _int_w(bits, observer="mse" if bits < 8 else "minmax"),
        QuantSpec(f"int{bits}", "tensor", symmetric=False, observer="mse" if bits < 8 else "minmax"),
        attn=AttnSpec(QuantSpec(f"int{bits}", "tensor", observer="minmax"),
                      QuantSpec(f"logsqrt2:{bits}", "tensor", observer="mse")),
        repq=True, rules=(LayerRule("*mlp.fc2", smooth=True),) if bits <= 4 else ())


def _depth(w_bits: int, a_bits: int, reconstruct: int) -> QuantConfig:
    """QuartDepth-style recipe for depth estimators: per-channel weights, static per-tensor
    activations quantized in the polished (log) domain, weights compensated for the activation
    error; at 4-bit weights, learned rounding per transformer block."""
    return QuantConfig(
        f"depth-w{w_bits}a{a_bits}", _int_w(w_bits, observer="mse" if w_bits < 8 else "minmax"),
        QuantSpec(f"int{a_bits}", "tensor", symmetric=False, observer="mse"),
        polish=True, compensate=True, reconstruct=reconstruct)


_PRESETS = {
    "w8a8": QuantConfig("w8a8", _int_w(8, observer="minmax"), _A8),
    "w8a8-static": QuantConfig("w8a8-static", _int_w(8, observer="minmax"),
                               QuantSpec("int8", "tensor", symmetric=False, observer="mse")),
    "fp8": QuantConfig("fp8", QuantSpec("e4m3", "channel"), _dyn_a("e4m3")),
    "w4a8": QuantConfig("w4a8", _int_w(4, 64), _A8),
    "w4a8-gptq": QuantConfig("w4a8-gptq", _int_w(4, 64), _A8, gptq=True),
    "w4a4": QuantConfig("w4a4", _int_w(4, 64), _dyn_a("int4", 64)),
    "w4a16": QuantConfig("w4a16", _int_w(4, 128), None),
    "w4a4-svd": QuantConfig("w4a4-svd", _int_w(4, 64), _dyn_a("int4", 64), rank=32, smooth=True),
    "w4a4-svd-fast": QuantConfig("w4a4-svd-fast", replace(_int_w(4, 64), int_group_scales=16),
                                 replace(_dyn_a("int4", 64), int_group_scales=16), rank=32,
                                 smooth=True),
    "nvfp4-svd": QuantConfig("nvfp4-svd", QuantSpec("nvfp4", observer="minmax"),
                             QuantSpec("nvfp4", dynamic=True), rank=32, smooth=True),
    "vit-w8a8": _vit(8),
    "vit-w6a6": _vit(6),
    "vit-w4a4": _vit(4),
    "depth-w8a8": _depth(8, 8, 0),
    "depth-w4a8": _depth(4, 8, 200),
    "depth-w4a4": _depth(4, 4, 200),
}

# Quantization-aware training recipes (vqz.train_qat): learnable weight scales (LSQ) and learned
# clip ratios of dynamic activations per timestep range; `rank` is the starting rank of the
# auxiliary low-rank branch that training decays to 0, or with keep_branch the rank of the 16-bit
# branch that is trained and kept (w4a4-svd-qat: w4a4-svd's quantizers, learned). Not for
# vqz.quantize.
_QAT_PRESETS = {
    "w4a4-qat": QuantConfig("w4a4-qat", replace(_int_w(4, 64), learnable=True),
                            replace(_dyn_a("int4", 64, symmetric=False), learnable=True), rank=32,
                            timestep_buckets=4, rotate=True),
    "w4a8-qat": QuantConfig("w4a8-qat", replace(_int_w(4, 64), learnable=True),
                            replace(_A8, learnable=True), rank=32, timestep_buckets=4),
    "w4a4-svd-qat": QuantConfig("w4a4-svd-qat", replace(_PRESETS["w4a4-svd"].weight, learnable=True),
                                replace(_PRESETS["w4a4-svd"].act, learnable=True), rank=32,
                                keep_branch=True, smooth=True, timestep_buckets=4),
}

# Recipes made for one model family, and the generic names that family's adapter resolves to them
# (vqz.quantize(timm_vit, "w8a8") runs "vit-w8a8"). A family recipe on a model of another family
# is refused; a QuantConfig object is used as given.
FAMILY_PRESETS = {
    "vit": {"w8a8": "vit-w8a8", "w6a6": "vit-w6a6", "w4a4": "vit-w4a4"},
    "depth": {"w8a8": "depth-w8a8", "w4a8": "depth-w4a8", "w4a4": "depth-w4a4"},
}
FAMILY_DESCRIPTIONS = {
    "vit": "timm vision-transformer classifiers (ViT, DeiT, DeiT-III, Swin, EVA, BEiT)",
    "depth": "depth estimators (Depth Anything, DPT)",
}

PRESET_DESCRIPTIONS = {
    "w8a8": "INT8 weights per output channel, INT8 activations per token (dynamic, asymmetric)",
    "w8a8-static": "INT8 weights per output channel, INT8 activations per tensor (calibrated)",
    "fp8": "FP8 E4M3 weights per output channel, FP8 E4M3 activations per token (dynamic)",
    "w4a8": "INT4 weights in groups of 64 (MSE-searched scales), INT8 activations per token",
    "w4a8-gptq": "w4a8 with GPTQ-rounded weights (needs calibration data)",
    "w4a4": "INT4 weights and activations in groups of 64 (round to nearest)",
    "w4a16": "INT4 weights in groups of 128, activations in full precision",
    "w4a4-svd": "SVDQuant: smoothing + rank-32 16-bit branch, INT4 group-64 weights and activations",
    "w4a4-svd-fast": "w4a4-svd with two-level group scales (integers 1..16 under one fp32 scale per "
                     "row): runs on the INT8 GPU kernels; 0.6 dB below w4a4-svd on the reference DiT",
    "nvfp4-svd": "SVDQuant with NVFP4 (E2M1, blocks of 16, E4M3 scales) weights and activations",
    "vit-w8a8": "timm ViT: INT8 weights per output channel, INT8 static per-tensor activations, "
                "INT8 q/k/v and log-sqrt2 8-bit softmax in attention",
    "vit-w6a6": "timm ViT: INT6 weights per output channel (MSE), INT6 static per-tensor activations, "
                "INT6 q/k/v and log-sqrt2 6-bit softmax in attention",
    "vit-w4a4": "timm ViT: INT4 weights per output channel (MSE), INT4 static per-tensor activations "
                "(fc2's post-GELU input per channel, folded into fc2), INT4 q/k/v and log-sqrt2 "
                "4-bit softmax in attention",
    "depth-w8a8": "depth: INT8 weights per output channel, INT8 static per-tensor polished (log-domain) "
                  "activations, compensated weights",
    "depth-w4a8": "depth: INT4 weights per output channel (MSE), INT8 polished activations, compensated "
                  "weights, learned rounding per block (200 steps)",
    "depth-w4a4": "depth: INT4 weights per output channel (MSE), INT4 polished activations, compensated "
                  "weights, learned rounding per block (200 steps)",
    "w4a4-qat": "QAT: INT4 group-64 weights with learned scales, INT4 group-64 dynamic "
                "asymmetric activations with learned clip ratios per timestep range, block-Hadamard "
                "rotation of the inputs, rank-32 auxiliary branch decayed to 0",
    "w4a8-qat": "QAT: INT4 group-64 weights with learned scales, INT8 per-token asymmetric "
                "activations with learned clip ratios per timestep range, rank-32 auxiliary branch "
                "decayed to 0",
    "w4a4-svd-qat": "QAT of SVDQuant (w4a4-svd): smoothing, INT4 group-64 weights with learned "
                    "scales, INT4 group-64 dynamic symmetric activations with learned clip ratios "
                    "per timestep range, rank-32 16-bit branch trained and kept",
}


def presets() -> list[str]:
    """Names of the built-in presets."""
    return list(_PRESETS)


def preset_family(name: str) -> str | None:
    """The model family a preset is made for ("vit", "depth"), or None for generic recipes."""
    return next((f for f, names in FAMILY_PRESETS.items() if name in names.values()), None)


def family_preset_name(name: str, family: str | None) -> str:
    """The recipe a preset name means for a model of `family` ("w8a8" -> "vit-w8a8" for "vit")."""
    return FAMILY_PRESETS.get(family, {}).get(name, name)


def check_preset_name(name: str) -> None:
    """Raise ValueError unless `name` is a preset or a generic name some family resolves."""
    if name not in _PRESETS and not any(name in names for names in FAMILY_PRESETS.values()):
        get_preset(name)


def qat_presets() -> list[str]:
    """Names of the built-in quantization-aware training recipes."""
    return list(_QAT_PRESETS)


def get_qat_preset(name: str) -> QuantConfig:
    if name not in _QAT_PRESETS:
        raise ValueError(f"unknown QAT preset {name!r}; the QAT presets are: {', '.join(_QAT_PRESETS)}")
    return _QAT_PRESETS[name]


def get_preset(name: str) -> QuantConfig:
    if name in _QAT_PRESETS:
        raise ValueError(f"{name!r} is a quantization-aware training recipe: train it with "
                         f"vqz.train_qat(model, {name!r}, data=..., steps=...) or `vqz qat`; "
                         f"vqz.quantize takes the post-training presets: {', '.join(_PRESETS)}")
    if name not in _PRESETS:
        families = [f"{FAMILY_DESCRIPTIONS[f]}: {names[name]!r}"
                    for f, names in FAMILY_PRESETS.items() if name in names]
        hint = f" ({name!r} names a family recipe only: {'; '.join(families)})" if families else ""
        raise ValueError(f"unknown preset {name!r}{hint}; the presets are: {', '.join(_PRESETS)}")
    return _PRESETS[name]


def resolve_config(config, family: str | None = None, **overrides) -> QuantConfig:
    """A preset name (resolved for a model of `family`, see FAMILY_PRESETS) or a QuantConfig (or
    its dict), with overrides applied."""
    if isinstance(config, str):
        cfg = get_preset(family_preset_name(config, family))
    elif isinstance(config, QuantConfig):
        cfg = config
    elif isinstance(config, dict):
        cfg = QuantConfig.from_dict(config)
    else:
        raise TypeError(f"config must be a preset name, a vqz.QuantConfig or a dict, "
                        f"got {type(config).__name__}")
    return cfg.with_overrides(**overrides) if overrides else cfg
