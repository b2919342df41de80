"""SVDQuant: smoothing plus a 16-bit low-rank branch that absorbs outliers before 4-bit rounding.

For y = x Wᵀ: λ_j = max|x_j|^α / max|W_:,j|^(1-α); Ŵ = W diag(λ); Ŵᵀ ≈ L1 L2 + Rᵀ with L1 [K, r],
L2 [r, N] the truncated SVD; R is quantized. At run time y = Q(x/λ) Q(R)ᵀ + ((x/λ) L1) L2.
α is chosen per layer by the output error on calibration rows, with the branch in the loop.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..config import QuantSpec
from ..quantizer import Quantizer

ALPHA_GRID = tuple(i / 10 for i in range(11))


@dataclass
class SVDResult:
    smooth: torch.Tensor | None  # λ [K] float32
    lowrank: tuple[torch.Tensor, torch.Tensor] | None  # L1 [K, r], L2 [r, N]
    alpha: float | None
    error: float | None  # relative output error on the calibration rows


def smoothing_factors(x_absmax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """λ [K] for activation channel maxima `x_absmax` [K] and weight `w` [N, K]."""
    w_absmax = w.abs().amax(dim=0).clamp_min(1e-5)
    lam = x_absmax.clamp_min(1e-5).pow(alpha) / w_absmax.pow(1 - alpha)
    return lam.clamp(1e-4, 1e4)


def truncated_svd(a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """a [K, N] ≈ L1 [K, r] @ L2 [r, N] (r <= min(K, N)), singular values split as √S on each side.

    A randomized SVD (torch.svd_lowrank) when the matrix is large against the rank.
    """
    if min(a.shape) > 4 * (rank + 16):
        # svd_lowrank draws a random projection: seed it so quantization is reproducible.
        with torch.random.fork_rng(devices=[a.device] if a.is_cuda else []):
            torch.manual_seed(0)
            u, s, v = torch.svd_lowrank(a, q=rank + 16, niter=4)
        vh = v.T
    else:
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def decompose(w: torch.Tensor, rank: int, weight_spec: QuantSpec, iters: int = 1):
    """Low-rank branch of `w` [N, K] (already smoothed): returns (L1, L2, Q(R)) where the branch is
    re-fit `iters` times to w - Q(R), so it also absorbs the residual's rounding error."""
    w = w.float()
    target = w
    for _ in range(iters):
        l1, l2 = truncated_svd(target.T, rank)
        residual = w - (l1 @ l2).T
        q_residual = Quantizer(weight_spec).fit(residual)(residual)
        target = w - q_residual
    return l1, l2, q_residual


def svd_quantize(w: torch.Tensor, *, rank: int, weight_spec: QuantSpec, act_spec: QuantSpec | None,
                 x_absmax: torch.Tensor | None = None, x_sample: torch.Tensor | None = None,
                 alpha: float | None = None, iters: int = 1) -> SVDResult:
    """Choose smoothing and the low-rank branch for one linear weight `w` [N, K].

    Without activation statistics there is no smoothing (the branch is a plain weight SVD). With
    them, α is `alpha` or, when None, the value of ALPHA_GRID with the smallest output error on
    `x_sample` [S, K]. Candidates are compared with min-max rounding of the residual (the weight
    spec's own observer, an MSE search say, costs tens of roundings per candidate); the layer then
    quantizes the chosen residual with the spec as given.
    """
    w = w.detach().float()
    if x_absmax is None:
        l1, l2, _ = decompose(w, rank, weight_spec, iters) if rank else (None, None, None)
        return SVDResult(None, (l1, l2) if rank else None, None, None)
    x = x_sample.float().to(w.device)
    reference = x @ w.T
    search_spec = replace(weight_spec, observer="minmax", learnable=False)
    best = None
    for a in (ALPHA_GRID if alpha is None else (alpha,)):
        lam = smoothing_factors(x_absmax.to(w.device), w, a)
        w_hat = w * lam
        if rank:
            l1, l2, q_residual = decompose(w_hat, rank, search_spec, iters)
        else:
            l1 = l2 = None
            q_residual = Quantizer(search_spec).fit(w_hat)(w_hat)
        x_hat = x / lam
        out = _quantize_input(act_spec, x_hat) @ q_residual.T
        if rank:
            out = out + (x_hat @ l1) @ l2
        err = ((out - reference).norm() / reference.norm().clamp_min(1e-12)).item()
        if best is None or err < best.error:
            best = SVDResult(lam, (l1, l2) if rank else None, a, err)
    if rank and iters > 1:  # the refined branch depends on how the residual is rounded
        l1, l2, _ = decompose(w * best.smooth, rank, weight_spec, iters)
        best.lowrank = (l1, l2)
    return best


def _quantize_input(spec: QuantSpec | None, x: torch.Tensor) -> torch.Tensor:
    if spec is None:
        return x
    quantizer = Quantizer(spec)
    if not spec.dynamic:
        quantizer.fit(x)
    return quantizer(x)
