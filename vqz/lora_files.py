"""Reading LoRA files: diffusers, PEFT and kohya state dicts and their alpha configs, grouped into
each module's down (A) and up (B) factors."""
from __future__ import annotations

import json
import numbers
import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open

WEIGHT_FILES = ("pytorch_lora_weights.safetensors", "adapter_model.safetensors",
                "pytorch_lora_weights.bin", "adapter_model.bin")
CONFIG_FILE = "adapter_config.json"  # PEFT's
METADATA_KEY = "lora_adapter_metadata"  # diffusers' LoRA config in the safetensors metadata

# `<module>.lora_A.weight` (diffusers, PEFT; PEFT may insert the adapter name before `.weight`),
# `<module>.lora.down.weight` (older diffusers), `<module>.lora_down.weight` (kohya)
_FACTOR_KEY = re.compile(r"(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora\.down|lora\.up|lora_down|"
                         r"lora_up)(?:\.[^.]+)?\.weight")
_ROLES = {"lora_A": "down", "lora.down": "down", "lora_down": "down",
          "lora_B": "up", "lora.up": "up", "lora_up": "up"}
_FORMATS = ("`<module>.lora_A.weight`/`lora_B.weight` (diffusers, PEFT), `<module>.lora.down.weight`/"
            "`lora.up.weight` or `<module>.lora_down.weight`/`lora_up.weight` with an optional "
            "`<module>.alpha` (kohya)")


def read_lora(source) -> tuple[dict[str, torch.Tensor], dict]:
    """The LoRA's tensors and its config (PEFT's LoraConfig fields; {} when there is none)."""
    if isinstance(source, Mapping):
        return as_tensors(source, "the state dict"), {}
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"source must be a LoRA file, a folder holding one, or a state dict; got "
                        f"{type(source).__name__}")
    path = Path(source)
    file = next((path / n for n in WEIGHT_FILES if (path / n).is_file()), None) \
        if path.is_dir() else path
    if file is None:
        raise FileNotFoundError(f"{path} holds none of {list(WEIGHT_FILES)}; pass the LoRA file "
                                f"itself")
    if not file.is_file():
        raise FileNotFoundError(f"no LoRA file at {file}")
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                config = json.loads((f.metadata() or {}).get(METADATA_KEY) or "{}")
        else:
            tensors, config = torch.load(file, map_location="cpu", weights_only=True), {}
        config_file = file.with_name(CONFIG_FILE)
        if config_file.is_file():
            config = json.loads(config_file.read_text())
    except Exception as e:  # any reader's failure means the same to the user
        raise ValueError(f"cannot read the LoRA at {file} ({type(e).__name__}: {e}); pass a "
                         f"safetensors (or PyTorch .bin) LoRA file, or a state dict") from e
    if not isinstance(tensors, Mapping):
        raise ValueError(f"{file} holds a {type(tensors).__name__}, not a state dict of LoRA factors")
    return as_tensors(tensors, str(file)), denoiser_config(config)


def as_tensors(source: Mapping, what: str) -> dict[str, torch.Tensor]:
    if not source:
        raise ValueError(f"{what} holds no tensors; expected LoRA factors keyed {_FORMATS}")
    tensors = {}
    for key, value in source.items():
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            value = torch.tensor(float(value))  # an alpha given as a number
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: {key!r} is a {type(value).__name__}, not a tensor")
        tensors[key] = value
    return tensors


def denoiser_config(config: dict) -> dict:
    """A pipeline's LoRA config prefixes each field with its component's name."""
    for component in ("transformer", "unet"):
        own = {k[len(component) + 1:]: v for k, v in config.items() if k.startswith(component + ".")}
        if own:
            return own
    return config


DORA = ("this is a DoRA adapter, which rescales the weight column by column; a low-rank branch "
         "cannot express that. Merge it into the full-precision model and quantize the result")


def group_factors(tensors: dict[str, torch.Tensor]) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """{module name as written: {"down" | "up" | "alpha": (key, tensor)}}."""
    groups, unknown = {}, []
    for key, value in tensors.items():
        match = _FACTOR_KEY.fullmatch(key)
        if match:
            module, role = match["module"], _ROLES[match["kind"]]
        elif key.endswith(".alpha"):
            module, role = key[:-len(".alpha")], "alpha"
        else:
            unknown.append(key)
            continue
        parts = groups.setdefault(module, {})
        if role in parts:
            raise ValueError(f"{parts[role][0]!r} and {key!r} both hold the {role} factor of "
                             f"{module!r} (a file with several adapters?); pass a state dict with "
                             f"the keys of one adapter")
        parts[role] = (key, value)
    if any("lora_magnitude_vector" in k for k in unknown):
        raise ValueError(DORA)
    if unknown:
        raise ValueError(f"{len(unknown)} keys are not LoRA factors: {unknown[:5]}; vqz reads "
                         f"{_FORMATS}")
    unpaired = [m for m, parts in groups.items() if not {"down", "up"} <= set(parts)]
    if unpaired:
        raise ValueError(f"modules without both LoRA factors (down/A and up/B): {unpaired[:5]}; "
                         f"the file is incomplete")
    return groups
