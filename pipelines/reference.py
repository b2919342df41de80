"""The project's small reference diffusion models (DESIGN §5.2), their sampler and their weights.

Two pixel-space models for 32x32 RGB images, in diffusers' own classes: a class-conditional DiT
(10 classes plus the null label for classifier-free guidance) and an unconditional UNet. Both predict
the noise (epsilon) of DDPM's 1000-step linear schedule. `samples/train_reference.py` trains them on
CIFAR-10 and saves fp16 weights into `samples/reference/<name>/`, installed as the package data
`vqz.reference`. They exist so that a quantized model can be measured against its own full-precision
self on samples drawn from the same seeds; they are not good generators.
"""
from __future__ import annotations

from importlib import resources
from pathlib import Path

import torch

from .optional import require

NUM_CLASSES = 10
# diffusers' LabelEmbedding keeps one row after the classes for the dropped (null) label.
NULL_CLASS = NUM_CLASSES

# Patch 4 (64 tokens) keeps CPU sampling fast; width 256 keeps every matrix a multiple of 128.
DIT_CONFIG = {
    "sample_size": 32,
    "patch_size": 4,
    "in_channels": 3,
    "out_channels": 3,
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 64,
    "num_embeds_ada_norm": NUM_CLASSES,
}

UNET_CONFIG = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (64, 128, 128),
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "UpBlock2D"),
    "attention_head_dim": 32,  # of the one attention layer, in the 8x8 mid block
}

def _diffusers():
    return require("diffusers", "diffusion")


MODEL_CLASSES = {"dit": "DiTTransformer2DModel", "unet": "UNet2DModel"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def build_dit(config: dict | None = None):
    """A randomly initialised DiTTransformer2DModel: (noisy image [B, 3, 32, 32], timestep [B],
    class label [B] in 0..9, or NULL_CLASS) -> predicted noise [B, 3, 32, 32].
    `config` overrides entries of DIT_CONFIG."""
    return _diffusers().DiTTransformer2DModel(**{**DIT_CONFIG, **(config or {})})


def build_unet(config: dict | None = None):
    """A randomly initialised UNet2DModel: (noisy image [B, 3, 32, 32], timestep [B]) -> predicted
    noise [B, 3, 32, 32]. `config` overrides entries of UNET_CONFIG."""
    return _diffusers().UNet2DModel(**{**UNET_CONFIG, **(config or {})})


def noise_scheduler():
    """The schedule of both training (`add_noise`) and sampling: DDPM's 1000 linear betas, DDIM steps.

    Trailing spacing makes the first sampling step t=999, the noisiest one the models were trained on.
    """
    return _diffusers().DDIMScheduler(num_train_timesteps=1000, beta_schedule="linear",
                                      beta_start=1e-4, beta_end=0.02, clip_sample=True,
                                      timestep_spacing="trailing")


@torch.no_grad()
def sample(model, *, n: int, seed: int, steps: int = 25, guidance: float = 3.0,
           class_labels=None) -> torch.Tensor:
    """n images [n, 3, 32, 32] in [0, 1] (float32, on the CPU), by deterministic DDIM (eta 0).

    The initial noise depends only on (n, seed), so every model, quantized or not, on any device,
    starts from the same noise. A DiT is sampled with classifier-free guidance of scale `guidance`
    for `class_labels` (default arange(n) % 10), in one forward of 2n per step; the unconditional
    UNet takes neither. The model runs on its own device and dtype.
    """
    conditional = isinstance(model, _diffusers().DiTTransformer2DModel)
    if class_labels is not None and not conditional:
        raise ValueError(f"class_labels given for the unconditional {type(model).__name__}")
    device, dtype = model.device, model.dtype
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 32, 32, generator=generator).to(device)
    if conditional:
        labels = torch.arange(n) % NUM_CLASSES if class_labels is None else torch.as_tensor(class_labels)
        if labels.shape != (n,):
            raise ValueError(f"class_labels has shape {tuple(labels.shape)}; expected ({n},)")
        labels = torch.cat([labels, torch.full_like(labels, NULL_CLASS)]).to(device)

    scheduler = noise_scheduler()
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        if conditional:
            timesteps = t.to(device).expand(2 * n)
            out = model(torch.cat([x, x]).to(dtype), timesteps, labels, return_dict=False)[0]
            eps_cond, eps_uncond = out.float().chunk(2)
            eps = eps_uncond + guidance * (eps_cond - eps_uncond)
        else:
            eps = model(x.to(dtype), t.to(device).expand(n), return_dict=False)[0].float()
        x = scheduler.step(eps, t, x).prev_sample
    return ((x + 1) / 2).clamp(0, 1).cpu()


def reference_dir() -> Path:
    """The installed folder of committed weights, one `<name>/` diffusers folder per model."""
    return Path(str(resources.files("vqz.reference")))


def load_reference(name: str, root: str | Path | None = None):
    """The reference model `name` ("dit" or "unet") in float32, eval mode, on the CPU, from
    `root/<name>/` (default: the committed weights in reference_dir())."""
    if name not in MODEL_CLASSES:
        raise ValueError(f"unknown reference model {name!r}; choose one of {sorted(MODEL_CLASSES)}")
    folder = Path(root if root is not None else reference_dir()) / name
    if not (folder / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"no weights for the reference model {name!r} in {folder}. Train them on a GPU with "
            f"`python samples/train_reference.py --model {name} --out samples/reference` "
            f"(data: $VQZ_DATA/cifar10/cifar10_test.npz) and commit samples/reference/{name}/")
    model_class = getattr(_diffusers(), MODEL_CLASSES[name])
    return model_class.from_pretrained(folder, torch_dtype=torch.float32).eval()
