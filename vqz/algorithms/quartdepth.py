"""QuartDepth's activation polishing statistic and weight compensation.

Compensation: a layer y = x Wᵀ receives quantized inputs x̂ = Q_a(x) at run time. The update ΔW that
minimises ||X Wᵀ - X̂ (W + ΔW)ᵀ||² + λ||ΔW||² over calibration rows X [S, K] has the closed form
ΔWᵀ = (X̂ᵀX̂ + λI)⁻¹ X̂ᵀ(X - X̂) Wᵀ (ridge regression, damped towards ΔW = 0). W' = W + ΔW is then
rounded by GPTQ with the Hessian of X̂: the least-squares residual is orthogonal to X̂'s columns,
so ||X Wᵀ - X̂ Q(W')ᵀ||² = const + ||X̂ (W' - Q(W'))ᵀ||², which is GPTQ's objective.
"""
from __future__ import annotations

import torch

from ..nn import QuantLinear, QuantWeight
from .gptq import gptq_quantize, input_hessian

POLISH_PERCENTILE = 90.0  # best of 10..99 on heavy-tailed channels (test_polishing_beats_uniform)


def polish_alpha(rows: torch.Tensor, percentile: float = POLISH_PERCENTILE) -> torch.Tensor:
    """α [K] from calibration input rows [S, K]: the per-channel percentile of |x|, floored so
    that a channel that was (almost) always zero does not make log2(α) blow up."""
    a = torch.quantile(rows.float().abs(), percentile / 100.0, dim=0)
    return a.clamp_min(1e-4 * a.mean().clamp_min(1e-12))


@torch.no_grad()
def compensated_weight(w: torch.Tensor, x: torch.Tensor, x_hat: torch.Tensor,
                       damp: float = 0.01) -> torch.Tensor:
    """W + ΔW [N, K] (float32) for full-precision rows x [S, K] and their quantized versions x_hat;
    `damp`: λ as a fraction of the mean diagonal of X̂ᵀX̂."""
    w, x, x_hat = w.float(), x.float(), x_hat.float()
    h = x_hat.T @ x_hat
    lam = damp * h.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], device=h.device)
    delta_t = torch.linalg.solve(h + lam * eye, x_hat.T @ ((x - x_hat) @ w.T))
    return w + delta_t.T


@torch.no_grad()
def compensate_layer(layer: QuantLinear, w: torch.Tensor, rows: torch.Tensor,
                     damp: float = 0.01) -> torch.Tensor:
    """Refit `layer`'s weight (full precision `w` [N, K]) to its calibrated activation quantizer
    on input rows [S, K] and GPTQ-round it into the layer, in place. Returns W' [N, K]."""
    rows = rows.to(w.device, torch.float32)
    x_hat = layer.act_quantizer(rows).float()
    target = compensated_weight(w, rows, x_hat, damp)
    spec = layer.weight_spec
    layer.qweight = QuantWeight.from_quantized(gptq_quantize(target, input_hessian(x_hat), spec), spec)
    return target
