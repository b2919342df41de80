"""Distances between two sets of image features: FID (Heusel et al. 2017) and KID (Bińkowski et al.
2018), in float64, pure torch.

Features are [N, D] arrays (torch tensors or anything `torch.as_tensor` takes), one row per image,
from the same extractor for both sets.
"""
from __future__ import annotations

import torch


def _check_sets(a, b, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Both feature sets as float64 CPU tensors [N, D], or a ValueError saying what is wrong."""
    a = torch.as_tensor(a).detach().to("cpu", torch.float64)
    b = torch.as_tensor(b).detach().to("cpu", torch.float64)
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{metric} takes feature arrays [N, D]; got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"the two feature sets differ in dimension ({a.shape[1]} vs {b.shape[1]}); "
                         f"compute both with the same feature extractor")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"{metric} needs at least 2 images per set (a covariance needs two "
                         f"samples); got {len(a)} and {len(b)}")
    return a, b


def feature_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], unbiased covariance [D, D]) of features [N, D], float64."""
    features = torch.as_tensor(features).to("cpu", torch.float64)
    return features.mean(0), torch.cov(features.T)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix (eigenvalues below 0 from rounding
    are treated as 0)."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance_from_statistics(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||² + Tr(S1 + S2 - 2 (S1 S2)^½) between the Gaussians N(mu1, S1) and N(mu2, S2).

    Tr (S1 S2)^½ is the sum of the square roots of the eigenvalues of the symmetric PSD matrix
    S1^½ S2 S1^½ (same spectrum as S1 S2), which stays real and stable for singular covariances
    (fewer images than dimensions) where a general matrix square root would not.
    """
    mu1, mu2, sigma1, sigma2 = (torch.as_tensor(t).to("cpu", torch.float64)
                                for t in (mu1, mu2, sigma1, sigma2))
    root1 = _psd_sqrt(sigma1)
    product = root1 @ sigma2 @ root1
    trace_sqrt = torch.linalg.eigvalsh((product + product.T) / 2).clamp_min(0).sqrt().sum()
    distance = (mu1 - mu2).square().sum() + sigma1.trace() + sigma2.trace() - 2 * trace_sqrt
    return max(distance.item(), 0.0)  # equal sets can round to -1e-13


def frechet_distance(features1, features2) -> float:
    """FID between two feature sets [N1, D] and [N2, D] (N1, N2 >= 2); 0 for identical sets."""
    a, b = _check_sets(features1, features2, "FID")
    return frechet_distance_from_statistics(*feature_statistics(a), *feature_statistics(b))


def _polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x·y / D + 1)³ for all rows of x [..., N, D] and y [..., M, D] -> [..., N, M]."""
    return (x @ y.transpose(-1, -2) / x.shape[-1] + 1) ** 3


def check_kid_options(subset_size: int, subsets: int) -> None:
    """ValueError unless a KID subset holds at least 2 images and there is at least one subset."""
    if subset_size < 2 or subsets < 1:
        raise ValueError(f"KID needs subset_size >= 2 and subsets >= 1; got {subset_size} and "
                         f"{subsets}")


def kernel_inception_distance(features1, features2, subset_size: int = 1000, subsets: int = 100,
                              seed: int = 0) -> dict:
    """KID: the unbiased estimate of MMD² with the cubic polynomial kernel, averaged over `subsets`
    random subsets of m = min(subset_size, N1, N2) images drawn without replacement from each set.

    Returns {"mean", "std" (over subsets, population), "subset_size": m, "subsets"}. The draws come
    from a generator seeded with `seed`, so results repeat exactly.
    """
    a, b = _check_sets(features1, features2, "KID")
    check_kid_options(subset_size, subsets)
    m = min(subset_size, len(a), len(b))
    generator = torch.Generator().manual_seed(seed)
    draws = [(torch.randperm(len(a), generator=generator)[:m],
              torch.randperm(len(b), generator=generator)[:m]) for _ in range(subsets)]
    # subsets go through the kernels in batches of about 2^24 values: few calls, bounded memory
    chunk = max(1, 2 ** 24 // (m * max(m, a.shape[1])))
    estimates = []
    for start in range(0, subsets, chunk):
        x = torch.stack([a[i] for i, _ in draws[start:start + chunk]])  # [c, m, D]
        y = torch.stack([b[j] for _, j in draws[start:start + chunk]])
        k_xx, k_yy = _polynomial_kernel(x, x), _polynomial_kernel(y, y)
        # the unbiased estimator leaves out the diagonal k(x_i, x_i) terms of the within-set sums
        within = (k_xx.sum((1, 2)) - k_xx.diagonal(dim1=1, dim2=2).sum(1) + k_yy.sum((1, 2))
                  - k_yy.diagonal(dim1=1, dim2=2).sum(1)) / (m * (m - 1))
        estimates.append(within - 2 * _polynomial_kernel(x, y).mean((1, 2)))
    estimates = torch.cat(estimates)
    return {"mean": estimates.mean().item(), "std": estimates.std(correction=0).item(),
            "subset_size": m, "subsets": subsets}
