"""Building models from names and paths: diffusers pipelines (hub id or folder), timm names, timm
model folders, local checkpoints.

Every loaded model comes with a `source` record (JSON) from which the same architecture is rebuilt
without weights (`build_skeleton`, `load_quantized_pipeline`), so a quantized checkpoint loads back.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import nn

from .optional import require

SOURCE_NAME = "vqz_model.json"


def is_diffusers_source(model: str) -> bool:
    """A diffusers pipeline folder (model_index.json) or a hub id like "org/name" (not timm's)."""
    path = Path(model)
    if path.exists():
        return (path / "model_index.json").is_file()
    return model.count("/") == 1 and not model.startswith(("timm/", "hf-hub:", "local-dir:"))


def load_pipeline(model: str, dtype: torch.dtype | None = None):
    """(diffusers pipeline, source record) from a hub id or a save_pretrained folder."""
    from diffusers import DiffusionPipeline

    path = Path(model)
    pipe = DiffusionPipeline.from_pretrained(str(path.resolve()) if path.exists() else model,
                                             torch_dtype=dtype)
    component = "transformer" if getattr(pipe, "transformer", None) is not None else "unet"
    if getattr(pipe, component, None) is None:
        raise ValueError(f"the pipeline {type(pipe).__name__} from {model} has no transformer or "
                         f"unet to quantize")
    source = {"source": "diffusers", "id": str(path.resolve()) if path.exists() else model,
              "component": component}
    return pipe, source


def denoiser_skeleton(model: str, component: str):
    """The pipeline's denoiser class built from its config with parameters on the meta device
    (buffers real), ready for vqz.load: the full-precision weights are never read."""
    import diffusers
    from accelerate import init_empty_weights
    from diffusers import DiffusionPipeline

    _, class_name = DiffusionPipeline.load_config(model)[component]
    cls = getattr(diffusers, class_name)
    with init_empty_weights():
        return cls.from_config(cls.load_config(model, subfolder=component))


def pipeline_with(model: str, component: str, denoiser, dtype: torch.dtype | None = None):
    """The pipeline `model` with `denoiser` in place of its own."""
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.from_pretrained(model, torch_dtype=dtype, **{component: denoiser})


def read_source(folder) -> dict:
    file = Path(folder) / SOURCE_NAME
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing: {folder} was not written by `vqz quantize`")
    return json.loads(file.read_text())


def load_model(model: str, checkpoint: str | None = None) -> tuple[nn.Module, dict]:
    """(module in eval mode, source record) for a timm model name or a timm model folder.

    A timm name whose pretrained weights cannot be downloaded gets random weights and a warning;
    `checkpoint` (a .safetensors, .pt or .pth state dict) then supplies real ones.
    """
    timm = require("timm", "vision")
    path = Path(model)
    if path.exists():
        config = path / "config.json"
        if not (config.is_file() and "architecture" in json.loads(config.read_text())):
            raise ValueError(f"{path} is not a timm model folder (a config.json with an "
                             f"'architecture' and its weights); diffusers folders are not supported "
                             f"by this command yet")
        net = timm.create_model(f"local-dir:{path.resolve()}", pretrained=True)
        source = {"source": "timm-folder", "path": str(path.resolve())}
    else:
        if not timm.list_models(model.split(".")[0]):
            raise ValueError(f"unknown model {model!r}: neither an existing path nor a timm model name "
                             f"(see timm.list_models())")
        source = {"source": "timm", "name": model}
        try:
            net = timm.create_model(model, pretrained=checkpoint is None)
        except Exception as e:  # no network, no weights for this tag, ...
            warnings.warn(f"could not load pretrained weights for {model!r} ({type(e).__name__}: "
                          f"{str(e)[:200]}); using random initialisation — pass --checkpoint for "
                          f"real weights", stacklevel=2)
            net = timm.create_model(model, pretrained=False)
    if checkpoint is not None:
        net.load_state_dict(read_state_dict(checkpoint))
        source["checkpoint"] = str(Path(checkpoint).resolve())
    return net.eval(), source


def read_state_dict(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state


def build_skeleton(source: dict) -> nn.Module:
    """The architecture a source record names, with tensors on the meta device (no weights)."""
    timm = require("timm", "vision")
    with torch.device("meta"):
        if source["source"] == "timm":
            return timm.create_model(source["name"], pretrained=False).eval()
        if source["source"] == "timm-folder":
            config = json.loads((Path(source["path"]) / "config.json").read_text())
            return timm.create_model(config["architecture"], pretrained=False,
                                     num_classes=config.get("num_classes", 1000),
                                     **config.get("model_args", {})).eval()
    raise ValueError(f"unknown model source {source.get('source')!r} in {SOURCE_NAME}")
