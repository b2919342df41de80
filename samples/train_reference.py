"""Train the reference diffusion models of vqz.pipelines.reference on CIFAR-10 and save them.

    python samples/train_reference.py --model both --out samples/reference --minutes 4

The data is the 10k-image CIFAR-10 test split, the only split in $VQZ_DATA. That is fine here: these
models exist to measure quantized models against their own full-precision selves, not to be
benchmarked. Each model trains for a time budget on the GPU (bf16 autocast, AdamW with warmup and
cosine decay, EMA of the weights), then its EMA weights are saved in fp16 with `save_pretrained` into
`<out>/<name>/` together with `samples.png`, a 4x4 grid sampled from the saved weights (the DiT's
rows cycle through the classes 0..9). On a machine without CUDA only a smoke test (`--steps N`) runs.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from training import (
    budgeted_steps,
    parse_budget,
    training_device,
    training_parser,
    warmup_cosine,
)
from vqz.pipelines.reference import (
    NULL_CLASS,
    build_dit,
    build_unet,
    load_reference,
    noise_scheduler,
    sample,
)

from vqz.eval.images import image_grid

LEARNING_RATE = {"dit": 3e-4, "unet": 2e-4}
WARMUP_STEPS = 200
EMA_DECAY = 0.999
LABEL_DROPOUT = 0.1


def parse_args():
    p = training_parser(__doc__.split("\n\n")[0], batch_size=256)
    p.add_argument("--model", choices=["dit", "unet", "both"], default="both")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the sample grid")
    return parse_budget(p)


def load_data(path: Path, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole data set on `device`: images uint8 [N, 3, 32, 32], labels int64 [N]."""
    data = np.load(path)
    images = torch.from_numpy(data["x"]).permute(0, 3, 1, 2).contiguous().to(device)
    return images, torch.from_numpy(data["y"]).to(device)


def random_batch(images, labels, size: int):
    """A batch of images [size, 3, 32, 32] in [-1, 1], randomly flipped left-right, and labels."""
    idx = torch.randint(len(images), (size,), device=images.device)
    x = images[idx].float() / 127.5 - 1
    flip = torch.rand(size, 1, 1, 1, device=x.device) < 0.5
    return torch.where(flip, x.flip(3), x), labels[idx]


def prepare_dit(model) -> None:
    """adaLN-Zero initialisation (every block starts as the identity, the output at zero), which the
    DiT paper found to train fastest, and no label dropout inside the model."""
    from diffusers.models.embeddings import LabelEmbedding

    for layer in [block.norm1.linear for block in model.transformer_blocks] + [model.proj_out_1,
                                                                               model.proj_out_2]:
        torch.nn.init.zeros_(layer.weight)
        torch.nn.init.zeros_(layer.bias)
    # diffusers drops labels in every block's embedder independently; train() drops each sample's
    # label once, so that all blocks see the same null label.
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0


def learning_rate(name: str, step: int, progress: float) -> float:
    return warmup_cosine(LEARNING_RATE[name], step, progress, WARMUP_STEPS)


def train(name: str, data, args, device: torch.device):
    """Train one model until its time or step budget is spent; returns its EMA copy."""
    torch.manual_seed(args.seed)
    model = (build_dit if name == "dit" else build_unet)().to(device).train()
    if name == "dit":
        prepare_dit(model)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    params, ema_params = list(model.parameters()), list(ema.parameters())
    net = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE[name], weight_decay=0.01)
    scheduler = noise_scheduler()
    n_params = sum(p.numel() for p in params)
    print(f"{name}: {n_params / 1e6:.2f}M parameters, batch {args.batch_size}, "
          f"{args.minutes:g} min" + (f" or {args.steps} steps" if args.steps else ""), flush=True)

    running_loss, start, done = torch.zeros((), device=device), time.perf_counter(), 0
    for step, progress, elapsed in budgeted_steps(args):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(name, step, progress)

        x0, labels = random_batch(*data, args.batch_size)
        noise = torch.randn_like(x0)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(x0),), device=device)
        xt = scheduler.add_noise(x0, noise, t)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            if name == "dit":
                labels = torch.where(torch.rand(len(x0), device=device) < LABEL_DROPOUT, NULL_CLASS, labels)
                pred = net(xt, t, labels, return_dict=False)[0]
            else:
                pred = net(xt, t, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            # the usual EMA warmup: early weights are forgotten quickly
            torch._foreach_lerp_(ema_params, params, 1 - min(EMA_DECAY, (1 + step) / (10 + step)))
        running_loss += loss.detach()
        done = step + 1
        if done % 200 == 0:
            print(f"{name} step {done:6d}  loss {running_loss.item() / 200:.4f}  "
                  f"lr {optimizer.param_groups[0]['lr']:.2e}  {done / elapsed:.1f} steps/s", flush=True)
            running_loss.zero_()
    elapsed = time.perf_counter() - start
    print(f"{name}: {done} steps in {elapsed:.0f} s ({done / elapsed:.1f} steps/s), "
          f"last loss {loss.item():.4f}", flush=True)
    return ema


def save(name: str, ema, args, device: torch.device) -> None:
    """fp16 EMA weights into <out>/<name>/, then a sample grid drawn from those saved weights."""
    folder = args.out / name
    ema.half().save_pretrained(folder, safe_serialization=True)
    model = load_reference(name, root=args.out).to(device)
    images = sample(model, n=16, seed=0, steps=args.sample_steps)
    image_grid(list(images.split(4))).save(folder / "samples.png")
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"{name}: saved {folder} ({size / 2**20:.1f} MB)", flush=True)


def main():
    args = parse_args()
    device = training_device(args)
    # Near-zero gradients (the DiT's zero-initialised adaLN gates) are denormals, ~50x slower on CPUs.
    torch.set_flush_denormal(True)
    data = load_data(args.data, device)
    for name in ["dit", "unet"] if args.model == "both" else [args.model]:
        save(name, train(name, data, args, device), args, device)


if __name__ == "__main__":
    main()
