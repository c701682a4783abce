"""Uniform dequantisation of discrete data and the negative log-likelihood losses ``fit`` trains flows with.

A density model on discrete data would put infinite density on the points; adding uniform noise
inside each bin (Theis et al. 2016; RealNVP sec. 4.1) gives a continuous density whose
log-likelihood lower-bounds the discrete one. Data scaled to ``[-1, 1]`` with ``n_bins`` levels
``x = 2 k / (n_bins - 1) - 1`` (8-bit images: 256; scikit-learn's digits: 17) become::

    y = 2 (k + u) / n_bins - 1,     u ~ U[0, 1)^D

and :func:`notelab.eval.likelihood.bits_per_dim` with the same ``n_bins`` and width 2 reports the
discrete log-likelihood in bits per dimension.
"""

from __future__ import annotations

import torch
from torch import nn

from notelab.core.errors import ConfigError, ShapeError
from notelab.eval.likelihood import bits_per_dim

# The levels of notelab's embedded digits (pixel counts 0..16).
DIGITS_BINS = 17


def to_bins(x: torch.Tensor, n_bins: int) -> torch.Tensor:
    """The integer level ``k`` of each value of ``x = 2 k / (n_bins - 1) - 1`` (nearest level)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise ConfigError(f"n_bins: expected an integer >= 2, got {n_bins!r}")
    if not bool(torch.isfinite(x).all()) or bool((x.abs() > 1 + 1e-4).any()):
        raise ShapeError("dequantize: expected finite data scaled to [-1, 1]")
    return torch.round((x + 1) / 2 * (n_bins - 1)).clamp(0, n_bins - 1)


def dequantize(x: torch.Tensor, n_bins: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``2 (k + u) / n_bins - 1`` with ``u ~ U[0, 1)`` drawn from ``generator`` (module docstring)."""
    k = to_bins(x, n_bins)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return 2 * (k + u) / n_bins - 1


def nll_loss(
    model: nn.Module, batch: torch.Tensor, generator: torch.Generator, n_bins: int | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """``fit``'s loss for a flow with ``log_prob``: the mean negative log-likelihood per dimension (nats).

    Per dimension keeps the learning rate meaningful across data sizes; with ``n_bins`` the batch
    is dequantised first and bits/dim is logged.
    """
    x = dequantize(batch, n_bins, generator) if n_bins is not None else batch
    dims = x[0].numel()
    log_p = model(x)  # forward is log_prob; calling the module keeps fit's DDP / compile wrappers
    loss = -log_p.mean() / dims
    metrics = {"bits_per_dim": float(bits_per_dim(log_p.detach().mean(), dims, n_bins))} if n_bins else {}
    return loss, metrics
