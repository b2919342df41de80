"""`vqz demo`: quantize a small image model built in code with several presets, offline.

The model is a seeded, randomly initialised patch transformer that maps an image to a slightly
changed image; each preset's outputs are compared with the full-precision outputs of the same
inputs (PSNR, SSIM, SQNR). Writes grid.png (rows: input, full precision, one per preset) and
metrics.json into the output folder.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .api import quantize
from .eval.images import image_grid, psnr, sqnr, ssim

DEMO_PRESETS = ("w8a8", "w4a8", "w4a4", "w4a4-svd")


class DemoBlock(nn.Module):
    def __init__(self, dim: int, heads: int = 4):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class DemoImageModel(nn.Module):
    """Image [B, 3, 32, 32] in [0, 1] -> image: input plus a transformer-predicted residual."""

    def __init__(self, dim: int = 96, depth: int = 3, patch: int = 4):
        super().__init__()
        self.patch = patch
        self.embed = nn.Conv2d(3, dim, patch, patch)
        self.blocks = nn.ModuleList(DemoBlock(dim) for _ in range(depth))
        self.head = nn.Linear(dim, 3 * patch * patch)

    def forward(self, x):
        b, _, h, w = x.shape
        t = self.embed(x).flatten(2).transpose(1, 2)
        for block in self.blocks:
            t = block(t)
        p = self.patch
        r = self.head(t).reshape(b, h // p, w // p, 3, p, p).permute(0, 3, 1, 4, 2, 5)
        return (x + 0.2 * torch.tanh(r.reshape(b, 3, h, w))).clamp(0, 1)


def demo_images(n: int = 8, size: int = 32, seed: int = 0) -> torch.Tensor:
    """n procedural RGB images [n, 3, size, size]: coloured discs over gradients and stripes."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        c0, c1, c2 = torch.rand(3, 3, 1, 1, generator=g)
        freq = 2 + 6 * torch.rand(1, generator=g).item()
        background = c0 * xx + c1 * (1 - xx) + 0.2 * torch.sin(freq * 6.28 * yy)
        cx, cy, r = torch.rand(3, generator=g) * torch.tensor([1.0, 1.0, 0.3]) + torch.tensor([0, 0, 0.1])
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2).float()
        images.append((background * (1 - disc) + c2 * disc).clamp(0, 1))
    return torch.stack(images)


def run_demo(out: Path) -> dict:
    torch.manual_seed(0)
    model = DemoImageModel().eval()
    images = demo_images()
    with torch.no_grad():
        reference = model(images)
    rows, metrics = [images, reference], {}
    for preset in DEMO_PRESETS:
        quantized = quantize(copy.deepcopy(model), preset, calib=[images])
        with torch.no_grad():
            output = quantized(images)
        rows.append(output)
        metrics[preset] = {"psnr_db": psnr(output, reference).mean().item(),
                           "ssim": ssim(output, reference).mean().item(),
                           "sqnr_db": sqnr(output, reference)}
    out.mkdir(parents=True, exist_ok=True)
    image_grid(rows).resize((8 * 34 * 3, len(rows) * 34 * 3), 0).save(out / "grid.png")
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"{'preset':10s} {'PSNR dB':>8s} {'SSIM':>6s} {'SQNR dB':>8s}   (vs full precision)")
    for preset, m in metrics.items():
        print(f"{preset:10s} {m['psnr_db']:8.2f} {m['ssim']:6.3f} {m['sqnr_db']:8.2f}")
    print(f"wrote {out / 'grid.png'} (rows: input, full precision, {', '.join(DEMO_PRESETS)}) and "
          f"{out / 'metrics.json'}")
    return metrics
