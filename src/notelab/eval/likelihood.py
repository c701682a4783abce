"""Bits per dimension: a continuous model's log-likelihood reported on the discrete 8-bit data.

A model of images scaled to ``[-1, 1]`` (width ``w = 2``) and dequantised by uniform noise
(Theis et al. 2016; Dinh et al. 2017, RealNVP sec. 4.1) gives ``log p(x)`` in nats. The integer
pixels ``k in {0..n_bins-1}`` map to ``x`` by an affine map of scale ``w / n_bins`` per dimension,
so the change of variables adds ``D log(w / n_bins)``::

    bits/dim = -(log p(x) + D log(w / n_bins)) / (D log 2)

For ``w = 2, n_bins = 256`` that is ``-log p(x) / (D log 2) + 7``.
"""

from __future__ import annotations

import math

import torch

from notelab.core.errors import ConfigError


def bits_per_dim(
    log_prob: torch.Tensor | float, num_dims: int, n_bins: int = 256, data_range: float = 2.0
) -> torch.Tensor | float:
    """Bits per dimension of the discrete data from ``log_prob`` (nats, per example) of the scaled data."""
    if num_dims < 1 or n_bins < 1 or data_range <= 0:
        raise ConfigError(
            f"bits_per_dim: expected num_dims >= 1, n_bins >= 1, data_range > 0, got {num_dims}, {n_bins}, {data_range}"
        )
    log_p_discrete = log_prob + num_dims * math.log(data_range / n_bins)
    return -log_p_discrete / (num_dims * math.log(2))
