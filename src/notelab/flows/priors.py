"""Base densities ``p_Z`` of a flow: factorised standard Gaussian and standard logistic.

NICE (Dinh et al. 2015, sec. 3.4) uses the standard logistic, ``log p(z) = -sum_d (softplus(z_d)
+ softplus(-z_d))``, whose heavier tails give better-behaved gradients than the Gaussian's;
RealNVP and continuous flows use the standard Gaussian, ``log p(z) = -(|z|^2 + D log 2 pi) / 2``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

LOG_2PI = math.log(2 * math.pi)


class StandardNormal(nn.Module):
    """``N(0, I_D)``: ``log_prob(z) -> (B,)`` and ``sample(n, generator) -> (n, D)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -0.5 * (z.pow(2).sum(dim=1) + self.dim * LOG_2PI)

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        return torch.randn(n, self.dim, generator=generator, device=device)


class StandardLogistic(nn.Module):
    """The factorised standard logistic, density ``p(z) = prod_d sigma(z_d) sigma(-z_d)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        return -(F.softplus(z) + F.softplus(-z)).sum(dim=1)

    def sample(
        self, n: int, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        # Inverse CDF: z = log u - log(1 - u); u kept off {0, 1} so z stays finite.
        u = torch.rand(n, self.dim, generator=generator, device=device).clamp(1e-7, 1 - 1e-7)
        return u.log() - (-u).log1p()


PRIORS = {"gaussian": StandardNormal, "logistic": StandardLogistic}
