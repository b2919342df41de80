"""LPIPS (Zhang et al. 2018, AlexNet variant, v0.1 linear weights) from the lpips package, else
from torchmetrics; both need torchvision's ImageNet AlexNet weights, downloaded once."""
from __future__ import annotations

from typing import Callable

import torch

from .features import MetricUnavailable

LPIPS_MIN_SIDE = 31  # AlexNet's third max-pool needs a 3x3 input


def _alex_lpips() -> torch.nn.Module:
    """The LPIPS network; forward(in0, in1, normalize=True) takes [B, 3, H, W] in [0, 1] and gives
    [B, 1, 1, 1]."""
    try:
        import lpips
    except ImportError:
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
        except ImportError as e:
            raise MetricUnavailable("neither the lpips package nor torchmetrics is installed; pip "
                                    "install lpips") from e
        return LearnedPerceptualImagePatchSimilarity(net_type="alex").net
    return lpips.LPIPS(net="alex", verbose=False)


def lpips_distance(device="cpu") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A callable (test, ref), both [B, 3, H, W] in [0, 1], -> LPIPS distances [B] (0 = same;
    lower is closer). Raises MetricUnavailable when the package or the weights cannot be had."""
    try:
        net = _alex_lpips()
    except MetricUnavailable:
        raise
    except Exception as e:  # the AlexNet weights download failed
        raise MetricUnavailable(f"its AlexNet weights could not be loaded ({type(e).__name__}: "
                                f"{e}); run once where download.pytorch.org is reachable, or put "
                                f"alexnet-owt-7be5be79.pth into {torch.hub.get_dir()}/checkpoints"
                                ) from e
    net = net.eval().to(device)

    def distance(test: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return net(test.to(device), ref.to(device), normalize=True).flatten()

    return distance
