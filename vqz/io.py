"""vqz.save / vqz.load: a quantized model as one safetensors file.

The file holds every tensor of the model's state dict as plain row-major tensors (packed 4-bit codes
[N, ceil(K/2)], scales, λ, L1, L2, and the full-precision layers), and in its metadata the format
version, the QuantConfig, the per-layer plan and a fingerprint of the architecture.
"""
from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file

from .algorithms.build import empty_layer
from .api import STATE_ATTR, QuantState, quant_state, resolve_target
from .config import QuantConfig
from .guard import guard_dtype
from .lora import check_saveable
from .nn.timestep import attach_timestep_state, detach_timestep_state, use_timestep_state
from .patch import LayerPlan, Plan, Skipped, Transaction, architecture_fingerprint, module_paths

FORMAT_VERSION = 1
WEIGHTS_NAME = "model.safetensors"


def _file(path) -> Path:
    path = Path(path)
    return path / WEIGHTS_NAME if path.is_dir() or not path.suffix else path


def save(obj, path) -> Path:
    """Write the quantized state of `obj` to `path` (a .safetensors file, or a directory that gets
    model.safetensors). Returns the file written."""
    state = quant_state(obj)
    check_saveable(obj)
    target = resolve_target(obj)
    file = _file(path)
    file.parent.mkdir(parents=True, exist_ok=True)
    tensors = {}
    seen = {}
    for name, t in target.state_dict().items():
        if t.device.type == "meta":
            raise ValueError(f"tensor {name!r} is on the meta device; load real weights first")
        # safetensors refuses tensors sharing memory (tied weights): store each one on its own.
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        tensors[name] = t.detach().contiguous().cpu().clone() if key in seen else t.detach().contiguous().cpu()
        seen[key] = name
    save_file(tensors, str(file), metadata=checkpoint_metadata(state))
    return file


def checkpoint_metadata(state: QuantState) -> dict[str, str]:
    """The safetensors metadata of a vqz checkpoint: format version, config, per-layer plan and
    architecture fingerprint of a model quantized as `state`."""
    return {
        "vqz_format_version": str(FORMAT_VERSION),
        "config": json.dumps(state.config.to_dict()),
        "layers": json.dumps([p.to_dict() for p in state.plan.layers]),
        "skipped": json.dumps([vars(s) for s in state.plan.skipped]),
        "architecture": state.architecture,
        "fingerprint": state.fingerprint,
        **({"requested_preset": state.requested} if state.requested else {}),
    }


def read_metadata(path) -> dict:
    file = _file(path)
    if not file.exists():
        raise FileNotFoundError(f"no vqz checkpoint at {file}")
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    if "vqz_format_version" not in metadata:
        raise ValueError(f"{file} is not a vqz checkpoint (no vqz_format_version in its metadata)")
    version = int(metadata["vqz_format_version"])
    if version > FORMAT_VERSION:
        raise ValueError(f"{file} was written in vqz checkpoint format {version}, newer than this "
                         f"vqz reads ({FORMAT_VERSION}); upgrade vqz")
    return metadata


def load(obj, path):
    """Quantize the full-precision skeleton `obj` (same architecture, real or meta tensors) as the
    checkpoint at `path` says and fill it with the stored tensors, bit-exactly. Returns `obj`."""
    target = resolve_target(obj)
    if getattr(target, STATE_ATTR, None) is not None:
        raise ValueError("load into a fresh full-precision skeleton, not an already quantized model")
    metadata = read_metadata(path)
    fingerprint = architecture_fingerprint(target)
    if fingerprint != metadata["fingerprint"]:
        raise ValueError(
            f"the checkpoint was written for a {metadata['architecture']} (architecture "
            f"{metadata['fingerprint']}), but the skeleton is a {type(target).__name__} (architecture "
            f"{fingerprint}); build the skeleton with the same class and config as the saved model")
    cfg = QuantConfig.from_dict(json.loads(metadata["config"]))
    plan = Plan([LayerPlan.from_dict(d) for d in json.loads(metadata["layers"])],
                [Skipped(**d) for d in json.loads(metadata["skipped"])])
    tx = Transaction(target)
    try:
        paths = module_paths(target)
        built = []
        for layer_plan in plan.layers:
            original = target.get_submodule(layer_plan.name)
            new = empty_layer(original, layer_plan)
            for p in paths[id(original)]:
                tx.swap(p, new)
            built.append(new)
        if any(p.buckets > 1 for p in plan.layers):
            use_timestep_state(built, attach_timestep_state(target))
            tx.undo.append(lambda: detach_timestep_state(target))
        with safe_open(str(_file(path)), framework="pt", device=_load_device(target)) as f:
            # clone: views into the file's buffer may be misaligned for SIMD, and BLAS then sums
            # in another order (full-precision layers would differ from the saved model by 1 ulp)
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
        _check_tensors(target, tensors)
        target.load_state_dict(tensors, strict=True, assign=True)
        tx.restore_modes()
        setattr(target, STATE_ATTR, QuantState(cfg, plan, fingerprint, type(target).__name__,
                                                metadata.get("requested_preset")))
        guard_dtype(target)
    except BaseException:
        tx.rollback()
        raise
    return obj


def _load_device(model) -> str:
    for t in (*model.parameters(), *model.buffers()):
        if t.device.type != "meta":
            return str(t.device)
    return "cpu"


def _check_tensors(model, tensors: dict) -> None:
    """Refuse before anything is assigned, so a bad file leaves the model untouched. Uncalibrated
    quantizer buffers are placeholders of shape [0] that take the stored shape."""
    expected = model.state_dict(keep_vars=True)
    unfilled = [n for n, b in model.named_buffers() if b.is_meta and n not in expected]
    if unfilled:
        raise ValueError(f"the skeleton has buffers on the meta device that no checkpoint holds "
                         f"(computed by the model itself): {unfilled[:5]}; build the skeleton with "
                         f"accelerate.init_empty_weights() (parameters on meta, buffers real)")
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    wrong = [(k, tuple(tensors[k].shape), tuple(t.shape)) for k, t in expected.items()
             if k in tensors and tuple(t.shape) not in {tuple(tensors[k].shape), (0,)}]
    if missing or unexpected or wrong:
        raise ValueError(f"the checkpoint does not fit this skeleton: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, wrong shapes {wrong[:5]}")
