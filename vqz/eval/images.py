"""Image similarity against a reference: PSNR and SSIM on [B, C, H, W] tensors in [0, 1]."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def psnr(test: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB [B] (data range 1)."""
    mse = (test.float() - ref.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim(test: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    """Per-image SSIM [B] (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03,
    data range 1, valid region), averaged over channels."""
    test, ref = test.float(), ref.float()
    channels = test.shape[1]
    window = _gaussian_window().to(test.device).expand(channels, 1, 11, 11)

    def blur(x):
        return F.conv2d(x, window, groups=channels)

    c1, c2 = 0.01 ** 2, 0.03 ** 2
    mu_x, mu_y = blur(test), blur(ref)
    var_x = blur(test * test) - mu_x ** 2
    var_y = blur(ref * ref) - mu_y ** 2
    cov = blur(test * ref) - mu_x * mu_y
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x ** 2 + mu_y ** 2 + c1) * (var_x + var_y + c2))
    return s.flatten(1).mean(1)


def sqnr(test: torch.Tensor, ref: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(|ref|² / |test - ref|²)."""
    ref = ref.double()
    noise = (test.double() - ref).pow(2).sum()
    return (10 * torch.log10(ref.pow(2).sum() / noise.clamp_min(1e-30))).item()


def image_grid(rows: list[torch.Tensor], pad: int = 2):
    """A PIL image with one row per [B, 3, H, W] tensor in [0, 1]."""
    from PIL import Image

    b, _, h, w = rows[0].shape
    canvas = torch.ones(3, len(rows) * (h + pad) + pad, b * (w + pad) + pad)
    for i, row in enumerate(rows):
        for j, img in enumerate(row):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            canvas[:, y:y + h, x:x + w] = img.clamp(0, 1)
    array = (canvas.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
    return Image.fromarray(array)
