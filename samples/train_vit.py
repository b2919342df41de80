"""Train the reference ViT of vqz.pipelines.reference_vit on CIFAR-10 and save it.

    python samples/train_vit.py --out samples/reference --minutes 4 --data .data/cifar10_test.npz

The data is the 10k-image CIFAR-10 test split, the only split in $VQZ_DATA: 8000 images train, 2000
(the last 200 of each class, `cifar10_split`) are held out to measure top-1. Eight thousand images
are few for a ViT trained for hundreds of epochs, so it is regularised: random crops (4-px zero
padding) and flips, Mixup/CutMix, label smoothing 0.1, drop path 0.1 and weight decay 0.05.
Training runs for a time budget on the GPU (bf16 autocast, AdamW with warmup and cosine decay,
all augmentation on GPU tensors), then the weights are saved in fp16 into
`<out>/vit/` (model.safetensors, config.json) with `metrics.json`, the held-out top-1 of the saved weights.
On a machine without CUDA only a smoke test (`--steps N`) runs.
"""
from __future__ import annotations

import json
import math
import random
import time

import torch
import torch.nn.functional as F
from training import (
    budgeted_steps,
    parse_budget,
    training_device,
    training_parser,
    warmup_cosine,
)
from vqz.pipelines.reference_vit import (
    NUM_CLASSES,
    VIT_DIR,
    build_vit,
    cifar10_split,
    load_reference_vit,
    preprocess,
    save_vit,
    top1,
)

LEARNING_RATE = 1e-3
WEIGHT_DECAY = 0.05
WARMUP_STEPS = 500
LABEL_SMOOTHING = 0.1
REPORT_SECONDS = 30


def parse_args():
    p = training_parser(__doc__.split("\n\n")[0], batch_size=512)
    p.add_argument("--held-out", type=int, default=2000, help="images kept out of training (stratified)")
    p.add_argument("--mix-prob", type=float, default=0.8, help="share of batches mixed by Mixup or CutMix")
    return parse_budget(p)


def random_batch(images, labels, size: int):
    """A batch of uint8 images [size, 3, 32, 32], each randomly cropped from its 4-px zero-padded
    version and flipped left-right (one gather for both), and its labels."""
    device = images.device
    idx = torch.randint(len(images), (size,), device=device)
    padded = F.pad(images[idx], (4, 4, 4, 4))  # [size, 3, 40, 40]
    offset = torch.randint(0, 9, (2, size, 1), device=device)
    ar = torch.arange(32, device=device)
    rows = offset[0] + ar  # [size, 32]
    flip = torch.rand(size, 1, device=device) < 0.5
    cols = offset[1] + torch.where(flip, 31 - ar, ar)
    batch = torch.arange(size, device=device)[:, None, None]
    x = padded[batch, :, rows[:, :, None], cols[:, None, :]]  # advanced indices first: [size, 32, 32, 3]
    return x.permute(0, 3, 1, 2), labels[idx]


def mix(x, targets):
    """Mixup (alpha 0.8) or CutMix (alpha 1.0), half the time each, of a batch with a shuffled copy
    of itself; the soft targets are mixed in the same proportion."""
    perm = torch.randperm(len(x), device=x.device)
    if random.random() < 0.5:
        lam = random.betavariate(0.8, 0.8)
        x = lam * x + (1 - lam) * x[perm]
    else:
        lam = random.betavariate(1.0, 1.0)
        h = w = round(32 * math.sqrt(1 - lam))
        top, left = random.randint(0, 32 - h), random.randint(0, 32 - w)
        x = x.clone()
        x[:, :, top:top + h, left:left + w] = x[perm, :, top:top + h, left:left + w]
        lam = 1 - h * w / 32 ** 2
    return x, lam * targets + (1 - lam) * targets[perm]


def learning_rate(step: int, progress: float) -> float:
    return warmup_cosine(LEARNING_RATE, step, progress, WARMUP_STEPS)


def param_groups(model):
    """Weight decay on matrices only: not on biases, norms, the position embedding or class token."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]


def evaluate(model, images, labels, device) -> float:
    model.eval()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        acc = top1(model, images, labels)
    model.train()
    return acc


def train(data, args, device: torch.device):
    """Train until the time or step budget is spent; returns the model and a summary."""
    train_x, train_y, held_x, held_y = data
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    model = build_vit().to(device).train()
    net = torch.compile(model) if args.compile else model
    optimizer = torch.optim.AdamW(param_groups(model), lr=LEARNING_RATE, betas=(0.9, 0.999),
                                  fused=device.type == "cuda")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"vit: {n_params / 1e6:.2f}M parameters, {len(train_x)} train / {len(held_x)} held-out images, "
          f"batch {args.batch_size}, {args.minutes:g} min" + (f" or {args.steps} steps" if args.steps else ""),
          flush=True)

    running_loss, start, done = torch.zeros((), device=device), time.perf_counter(), 0
    last_report, last_report_step = start, 0
    for step, progress, _ in budgeted_steps(args):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, progress)

        images, labels = random_batch(train_x, train_y, args.batch_size)
        x = preprocess(images)
        targets = F.one_hot(labels, NUM_CLASSES).float() * (1 - LABEL_SMOOTHING) + LABEL_SMOOTHING / NUM_CLASSES
        if random.random() < args.mix_prob:
            x, targets = mix(x, targets)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        running_loss += loss.detach()
        done = step + 1
        if time.perf_counter() - last_report >= REPORT_SECONDS:
            now = time.perf_counter()
            print(f"vit step {done:6d}  {now - start:5.0f} s  train loss "
                  f"{running_loss.item() / (done - last_report_step):.4f}  held-out top-1 "
                  f"{evaluate(model, held_x, held_y, device):.4f}  lr {optimizer.param_groups[0]['lr']:.2e}  "
                  f"{(done - last_report_step) / (now - last_report):.1f} steps/s", flush=True)
            running_loss.zero_()
            last_report, last_report_step = time.perf_counter(), done
    elapsed = time.perf_counter() - start
    acc = evaluate(model, held_x, held_y, device)
    print(f"vit: {done} steps in {elapsed:.0f} s ({done / elapsed:.1f} steps/s, "
          f"{done * args.batch_size / len(train_x):.0f} epochs), last loss {loss.item():.4f}, "
          f"held-out top-1 {acc:.4f}", flush=True)
    return model, {"steps": done, "seconds": round(elapsed, 1), "parameters": n_params,
                   "train_images": len(train_x), "held_out_images": len(held_x)}


def save(model, summary: dict, data, args, device: torch.device) -> None:
    """fp16 weights and config.json into <out>/vit/, then metrics.json with the held-out top-1 of
    those saved weights (reloaded in float32)."""
    folder = save_vit(model, args.out / VIT_DIR)
    saved = load_reference_vit(root=args.out).to(device)
    acc = top1(saved, data[2], data[3])
    metrics = {"held_out_top1": acc, **summary}
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    size = sum(f.stat().st_size for f in folder.iterdir())
    print(f"vit: saved {folder} ({size / 2**20:.1f} MB), held-out top-1 of the saved fp16 weights "
          f"{acc:.4f}", flush=True)


def main():
    args = parse_args()
    device = training_device(args)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    data = [t.to(device) for t in cifar10_split(args.data, args.held_out)]
    model, summary = train(data, args, device)
    save(model, summary, data, args, device)


if __name__ == "__main__":
    main()
