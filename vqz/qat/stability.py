"""Keeping 4-bit QAT stable: spike-aware gradient clipping and moment resets (SPAM-style), for
Adam-family optimizers."""
from __future__ import annotations

import torch


def _inner(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer


@torch.no_grad()
def clip_spikes(optimizer, threshold: float) -> int:
    """Clip gradient entries with g² > threshold · v (v: Adam's second-moment estimate) to
    sign(g) · sqrt(threshold · v); entries without a moment yet are left alone. Returns how many
    were clipped."""
    inner = _inner(optimizer)
    clipped = 0
    for group in inner.param_groups:
        for p in group["params"]:
            v = inner.state.get(p, {}).get("exp_avg_sq")
            if p.grad is None or v is None:
                continue
            limit = (threshold * v).sqrt()
            spikes = p.grad.abs() > limit
            clipped += int(spikes.sum())
            p.grad.copy_(torch.where(spikes, p.grad.sign() * limit, p.grad))
    return clipped


def reset_moments(optimizer, params=None) -> None:
    """Forget the optimizer state of `params` (default: all), so Adam restarts them with bias
    correction from step 0 instead of applying moments of directions that no longer exist."""
    inner = _inner(optimizer)
    targets = [p for g in inner.param_groups for p in g["params"]] if params is None else params
    for p in targets:
        inner.state.pop(p, None)
