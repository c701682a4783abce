"""Rotary position embedding (RoPE, Su et al. 2021, "RoFormer", eq. 34) with Llama 3.1 scaling.

Each pair of features (x_i, x_{i+D/2}) of a query or key at position p is rotated by the angle
p * theta_i, theta_i = base^(-2i/D):

    RoPE(x)_i       = x_i cos(p theta_i) - x_{i+D/2} sin(p theta_i)
    RoPE(x)_{i+D/2} = x_{i+D/2} cos(p theta_i) + x_i sin(p theta_i)

so q.k depends on positions only through their difference. The pairing (i, i + D/2) ("rotate
half") is the Hugging Face Llama layout.

Llama 3.1 context extension (Llama 3 report, and its reference code): with wavelength
lambda_i = 2 pi / theta_i and original context L (8192),

    lambda_i < L / high_freq_factor  -> theta_i unchanged           (high frequencies)
    lambda_i > L / low_freq_factor   -> theta_i / factor            (low frequencies)
    otherwise                        -> (1 - s) theta_i / factor + s theta_i,
                                        s = (L / lambda_i - low_freq_factor) / (high_freq_factor - low_freq_factor)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class RopeScaling:
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


def rope_inv_freq(head_dim: int, theta: float = 10000.0, scaling: RopeScaling | None = None) -> torch.Tensor:
    """The ``D/2`` rotation frequencies theta_i (float32), Llama-3.1-scaled when ``scaling`` is given."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is not None:
        inv_freq = llama3_scale(inv_freq, scaling)
    return inv_freq.float()


def llama3_scale(inv_freq: torch.Tensor, s: RopeScaling) -> torch.Tensor:
    """Apply the Llama 3.1 piecewise frequency scaling (module docstring) to ``inv_freq``."""
    wavelen = 2 * math.pi / inv_freq
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor
    )
    mid = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    out = torch.where(wavelen > low_wavelen, inv_freq / s.factor, inv_freq)
    return torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), mid, out)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables ``(..., T, D)`` for integer ``positions`` ``(..., T)``."""
    angles = positions[..., None].float() * inv_freq.to(positions.device)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, H, T, D)`` by tables ``(T, D)`` or ``(B, 1, T, D)``; computed in x's dtype."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)
