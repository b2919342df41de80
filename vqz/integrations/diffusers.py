"""vqz as a diffusers quantization backend ("vqz").

    from vqz.integrations.diffusers import VQZConfig
    transformer = FluxTransformer2DModel.from_pretrained(model_id, subfolder="transformer",
                                                         quantization_config=VQZConfig("w4a4"))
    pipe = FluxPipeline.from_pretrained(model_id, quantization_config=PipelineQuantizationConfig(
        quant_mapping={"transformer": VQZConfig("w8a8")}))
    transformer.save_pretrained(folder)               # config.json + the vqz weights file
    FluxTransformer2DModel.from_pretrained(folder)     # the same quantized model, bit-exactly

Quantizing at load runs `vqz.quantize(model, preset, **overrides)` once the full-precision weights
are in, so only recipes that need no calibration data work there. A model quantized with
calibration (`vqz.quantize(model, "w4a4-svd", calib=...)`) gets the same save_pretrained /
from_pretrained round trip through `enable_save_pretrained(model)`. A `vqz.save` file loads with
`from_single_file(model_cls, path, config=...)`.

The saved weights file is a vqz checkpoint (the format of `vqz.save`: config, per-layer plan and
architecture fingerprint in its safetensors metadata); from_pretrained builds the model from
config.json on the meta device and hands it to `vqz.load`, which rebuilds the quantized layers
from the plan and fills every tensor as stored.
"""
from __future__ import annotations

import importlib
import importlib.metadata
from enum import Enum


from ..api import quant_state, quantize
from ..config import get_preset, presets, resolve_config
from ..guard import guard_dtype
from ..io import checkpoint_metadata, load

WRITTEN_FOR = "0.42"  # the diffusers version whose backend interface this module implements


def _incompatible(error: Exception) -> ImportError:
    version = importlib.metadata.version("diffusers")
    return ImportError(
        f"vqz plugs into diffusers as a quantization backend through diffusers.quantizers "
        f"(DiffusersQuantizer, QuantizationConfigMixin and the registries AUTO_QUANTIZER_MAPPING "
        f"and AUTO_QUANTIZATION_CONFIG_MAPPING of diffusers.quantizers.auto), as in diffusers "
        f"{WRITTEN_FOR}; the installed diffusers {version} lacks part of it ({error}). Install "
        f"diffusers {WRITTEN_FOR}, or quantize without the backend: vqz.quantize(model, ...) after "
        f"loading, vqz.save / vqz.load")


try:
    from diffusers.quantizers.base import DiffusersQuantizer
    from diffusers.quantizers.quantization_config import QuantizationConfigMixin
except ModuleNotFoundError as e:
    if e.name != "diffusers":
        raise _incompatible(e) from e
    raise ImportError("vqz.integrations.diffusers needs diffusers: "
                      "pip install 'vqz[diffusion]'") from e
except ImportError as e:
    raise _incompatible(e) from e


class VQZMethod(str, Enum):
    """The `quant_method` of vqz configs (diffusers reads its `.value`)."""

    VQZ = "vqz"

    def __str__(self) -> str:
        return self.value


def calibration_free_presets() -> list[str]:
    """The presets vqz.quantize applies without calibration data: those a load can apply."""
    return [name for name in presets() if not get_preset(name).needs_calibration]


class VQZConfig(QuantizationConfigMixin):
    """`quantization_config=VQZConfig(preset, **overrides)` quantizes a diffusers model with
    `vqz.quantize(model, preset, **overrides)` once its weights are loaded.

    preset: a vqz preset that needs no calibration data (`calibration_free_presets()`: w8a8, fp8,
    w4a8, w4a4, w4a16); overrides: QuantConfig fields (group_size=128, exclude=["*proj_out*"]).
    Checked here, so a bad preset fails before any weight is read. In a saved model's config.json
    the config records the recipe's name; the weights file holds the exact config and plan.
    """

    def __init__(self, preset: str = "w8a8", **overrides):
        cfg = resolve_config(preset, **overrides)
        if cfg.needs_calibration:
            asked = f"preset {preset!r}" + (f" with {overrides}" if overrides else "")
            raise ValueError(
                f"{asked} needs calibration data (static activation scales, smoothing, GPTQ or "
                f"reconstruction), which loading cannot supply. Use a calibration-free preset "
                f"here ({', '.join(calibration_free_presets())}), or load the full-precision model "
                f"and call vqz.quantize(model, {preset!r}, calib=...) on it (then "
                f"vqz.integrations.diffusers.enable_save_pretrained(model) to save it with "
                f"save_pretrained)")
        self._fill(preset, overrides)

    def _fill(self, preset: str, overrides: dict) -> None:
        self.quant_method = VQZMethod.VQZ
        self.preset = preset
        self.overrides = dict(overrides)

    @classmethod
    def from_dict(cls, config_dict: dict, return_unused_kwargs: bool = False, **kwargs):
        """The config of a saved model (config.json): it describes a finished quantization, so any
        preset is accepted, calibrated ones too."""
        config = cls.__new__(cls)
        config._fill(config_dict["preset"], config_dict.get("overrides", {}))
        return (config, kwargs) if return_unused_kwargs else config

    def to_dict(self) -> dict:
        return {"quant_method": self.quant_method.value, "preset": self.preset,
                "overrides": dict(self.overrides)}

    def to_diff_dict(self) -> dict:  # diffusers' repr and to_json_string ask for it
        return self.to_dict()

    def __eq__(self, other) -> bool:  # the base dataclass would compare quant_method alone
        return isinstance(other, VQZConfig) and self.to_dict() == other.to_dict()

    __hash__ = None  # mutable, as the base dataclass


class VQZQuantizer(DiffusersQuantizer):
    """The diffusers backend of VQZConfig. Not pre-quantized: `vqz.quantize` after the weights load.
    Pre-quantized (a saved vqz model): `vqz.load` of the checkpoint into the meta-device skeleton
    before diffusers' own loading, which then has nothing left to assign."""

    use_keep_in_fp32_modules = True  # a load in fp16/bf16 keeps the model's float32 modules

    def __init__(self, quantization_config: VQZConfig, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.checkpoint_files: list[str] = []
        self.state = None  # the model's vqz QuantState, once quantized

    @property
    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False

    @property
    def is_compileable(self) -> bool:
        return True

    def validate_environment(self, *args, device_map=None, **kwargs) -> None:
        # vqz swaps layers after accelerate has placed them, and a saved model is read whole
        places = set(map(str, device_map.values())) if isinstance(device_map, dict) else set()
        if len(places) > 1 or "disk" in places:
            raise ValueError(
                f"vqz quantizes and loads a model on one device, but device_map places it on "
                f"{sorted(places)}; load it onto one device (device_map=None, \"cuda\", ...) and "
                f"save memory with pipe.enable_model_cpu_offload() or "
                f"model.enable_group_offload()")

    def maybe_update_loaded_keys(self, loaded_keys: list[str], checkpoint_files: list[str]):
        self.checkpoint_files = list(checkpoint_files)
        return loaded_keys

    def _process_model_before_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            return model
        if len(self.checkpoint_files) != 1:
            raise ValueError(
                f"this vqz model is saved in {len(self.checkpoint_files)} shards, but vqz reads "
                f"one weights file: save it again as one file, save_pretrained(folder, "
                f"max_shard_size=\"1000GB\")")
        return load(model, self.checkpoint_files[0])

    def maybe_update_state_dict(self, state_dict: dict) -> dict:
        # vqz.load has assigned every stored tensor already, bit-exactly and in its stored dtype.
        return {} if self.pre_quantized else state_dict

    def _process_model_after_weight_loading(self, model, **kwargs):
        if not self.pre_quantized:
            quantize(model, self.quantization_config.preset, **self.quantization_config.overrides)
        self.state = quant_state(model)
        return guard_dtype(model)

    def get_state_dict_and_metadata(self, state_dict: dict, safe_serialization: bool = False):
        if not safe_serialization:
            raise ValueError("a vqz model is saved as safetensors, whose metadata holds its "
                             "quantization plan: call save_pretrained with safe_serialization=True")
        return state_dict, checkpoint_metadata(self.state)

    def _dequantize(self, model):
        raise NotImplementedError("a vqz model keeps no full-precision weights to return to: load "
                                  "the original model again")


def enable_save_pretrained(model):
    """Give a diffusers model quantized with vqz.quantize or vqz.load what a model loaded with
    `quantization_config=VQZConfig(...)` has: the vqz backend (`model.hf_quantizer`) and the
    quantization config in `model.config`, so that `save_pretrained` writes a folder that
    `from_pretrained` loads back bit-exactly (calibrated recipes too). Returns `model`."""
    from diffusers import ModelMixin

    if not isinstance(model, ModelMixin):
        raise TypeError(f"enable_save_pretrained takes a diffusers model (ModelMixin), got "
                        f"{type(model).__name__}; save other models with vqz.save")
    state = quant_state(model)
    config = VQZConfig.from_dict({"preset": state.requested or state.config.name})
    quantizer = VQZQuantizer(config, pre_quantized=True)
    model.is_quantized, model.quantization_method = True, config.quant_method  # as diffusers' load
    model.hf_quantizer = quantizer
    model.register_to_config(quantization_config=config)
    return quantizer.postprocess_model(model)


def from_single_file(model_cls, path, config, *, subfolder: str | None = None):
    """A diffusers model of class `model_cls` rebuilt from the `vqz.save` checkpoint at `path`.

    config: the model's diffusers config, as a dict or as a folder or hub id holding its
    config.json (`subfolder` inside it): the checkpoint holds the quantization, not the
    architecture's hyperparameters. The model is built on the meta device, then `vqz.load` fills
    it; it can be saved with save_pretrained."""
    from accelerate import init_empty_weights

    if not isinstance(config, dict):
        config = model_cls.load_config(config, subfolder=subfolder)
    with init_empty_weights():
        model = model_cls.from_config(config)
    return enable_save_pretrained(load(model, path).eval())


def register() -> None:
    """Add VQZConfig and VQZQuantizer to diffusers' registries of quantization backends under
    "vqz". Idempotent. Raises ImportError naming the diffusers version if the registries moved."""
    try:
        auto = importlib.import_module("diffusers.quantizers.auto")
        quantizers, configs = auto.AUTO_QUANTIZER_MAPPING, auto.AUTO_QUANTIZATION_CONFIG_MAPPING
    except (ImportError, AttributeError) as e:
        raise _incompatible(e) from e
    quantizers[VQZMethod.VQZ.value] = VQZQuantizer
    configs[VQZMethod.VQZ.value] = VQZConfig


register()
