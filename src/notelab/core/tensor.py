"""Rank-agnostic tensor helpers, so one sampler serves 2-D toy data and images alike."""

from __future__ import annotations

import torch


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to ``x`` until it has ``ndim`` dims.

    A per-sample coefficient of shape ``(B,)`` becomes ``(B, 1, 1, 1)`` to broadcast against an
    image batch ``(B, C, H, W)``, or ``(B, 1)`` against points ``(B, D)``.
    """
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"append_dims: input has {x.ndim} dims, more than the target {ndim}")
    return x.reshape(*x.shape, *([1] * missing))


def batch_timesteps(t: torch.Tensor | int | float, batch: int, device: torch.device) -> torch.Tensor:
    """Broadcast a scalar or ``(B,)`` timestep to a ``(B,)`` tensor on ``device``."""
    t = torch.as_tensor(t, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    return t
