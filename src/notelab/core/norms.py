"""Normalisation layers.

RMSNorm (Zhang & Sennrich 2019), used by LLaMA (Touvron et al. 2023) in place of LayerNorm:

    RMSNorm(x) = x / sqrt(mean(x^2) + eps) * g

No mean subtraction and no bias: cheaper than LayerNorm and as good in practice. The statistic is
computed in float32 whatever the input dtype, then cast back (as the reference Llama code does).
"""

from __future__ import annotations

import torch
from torch import nn


def rms_scale(x: torch.Tensor, eps: float) -> torch.Tensor:
    """``1 / sqrt(mean(x^2) + eps)`` over the last axis, float32 ``(..., 1)``: the factor RMSNorm multiplies by."""
    return torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, the statistic in float32."""
    xf = x.float()
    xf = xf * rms_scale(xf, eps)
    return weight * xf.to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        """Weights back to 1 (torch's convention: a model materialised from the meta device calls it)."""
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
