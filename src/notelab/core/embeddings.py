"""Position and time embeddings.

Sinusoidal embedding (Vaswani et al. 2017, section 3.5), used for token positions and, with a
continuous or integer timestep in place of the position, for diffusion time (Ho et al. 2020):

    PE(p, 2i)   = sin(p / max_period^(2i/d))
    PE(p, 2i+1) = cos(p / max_period^(2i/d))

This module returns the sines in the first half and the cosines in the second half of the
feature dimension (the layout of DDPM's and most diffusion code's time embedding); the
Transformer's interleaved layout is a fixed permutation of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Embed positions or timesteps ``t`` of shape ``(B,)`` as ``(B, dim)`` [sin | cos] features."""
    if dim % 2:
        raise ValueError(f"sinusoidal_embedding: dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """Sinusoidal features of ``t`` followed by a 2-layer MLP: (B,) -> (B, out_dim)."""

    def __init__(self, dim: int, out_dim: int, max_period: float = 10000.0) -> None:
        super().__init__()
        self.dim = dim
        self.max_period = max_period
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.SiLU(), nn.Linear(out_dim, out_dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.mlp(sinusoidal_embedding(t, self.dim, self.max_period))
