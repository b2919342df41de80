"""vqz: 8- and 4-bit quantization of diffusion pipelines and vision models.

    import vqz
    vqz.quantize(model_or_pipe, "w4a4-svd", calib=...)
    vqz.train_qat(model_or_pipe, "w4a4-qat", data=..., steps=...)  # quantization-aware training
    vqz.summary(model_or_pipe); vqz.save(model, "q.safetensors"); vqz.load(skeleton, "q.safetensors")
"""
from .api import quantize, summary
from .config import LayerRule, QuantConfig, QuantSpec, presets
from .io import load, save
from .qat_api import train_qat

__version__ = "0.1.0"
__all__ = ["quantize", "train_qat", "summary", "save", "load", "presets", "QuantConfig", "QuantSpec", "LayerRule"]

from . import integrations  # noqa: E402,F401  (registers the "vqz" diffusers backend once diffusers loads)
