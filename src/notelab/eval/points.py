"""Sample-quality metrics for low-dimensional data: MMD and log-likelihood under a known density.

Maximum mean discrepancy (Gretton et al. 2012, JMLR, Lemma 6, eq. 3) with kernel ``k``::

    MMD^2_u = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
              - 2/(m n) sum_{i, j} k(x_i, y_j)

the unbiased estimate (it can be slightly negative when both samples come from one distribution).
The kernel is the average of RBF kernels ``exp(-|a - b|^2 / (2 sigma^2))`` over several bandwidths,
which keeps the test sensitive at more than one length scale (a mixture of characteristic
kernels is characteristic). By default the bandwidths are the median pairwise distance of the
pooled sample times (1/4, 1/2, 1, 2, 4).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.data.toy import ToyDensity, toy_density

BANDWIDTH_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
_CHUNK = 2048  # rows per block of the kernel matrix, to bound memory at _CHUNK * n * 8 bytes


def _flat64(x: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    x = torch.as_tensor(x).detach().cpu().to(torch.float64)
    if x.ndim < 1 or x.shape[0] < 2:
        raise ShapeError(f"{name}: expected at least 2 samples of shape (N, ...), got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ShapeError(f"{name}: expected finite values, found NaN or Inf")
    return x.reshape(x.shape[0], -1)


def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b).pow(2)


def median_bandwidth(x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, max_points: int = 1000) -> float:
    """The median heuristic: median pairwise distance of the pooled sample (first ``max_points`` of each)."""
    z = torch.cat([_flat64(x, "x")[:max_points], _flat64(y, "y")[:max_points]])
    d = torch.pdist(z)
    med = d.median().item() if d.numel() else 0.0
    return med if med > 0 else 1.0


def rbf_kernel(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, bandwidths: Sequence[float] | float
) -> torch.Tensor:
    """Mixture RBF kernel matrix ``mean_s exp(-|x_i - y_j|^2 / (2 s^2))``, shape ``(N, M)``, float64."""
    bws = _check_bandwidths(bandwidths)
    d2 = _sq_dists(_flat64(x, "x"), _flat64(y, "y"))
    return sum(torch.exp(-d2 / (2 * s * s)) for s in bws) / len(bws)


def _check_bandwidths(bandwidths: Sequence[float] | float) -> tuple[float, ...]:
    bws = (float(bandwidths),) if isinstance(bandwidths, (int, float)) else tuple(float(b) for b in bandwidths)
    if not bws or not all(b > 0 for b in bws):
        raise ConfigError(f"mmd: expected one or more positive bandwidths, got {bandwidths!r}")
    return bws


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, bws: tuple[float, ...], drop_diagonal: bool) -> float:
    """``sum_ij k(a_i, b_j)`` (without ``i == j`` when ``a is b``), in row blocks."""
    total = 0.0
    for start in range(0, len(a), _CHUNK):
        d2 = _sq_dists(a[start : start + _CHUNK], b)
        k = sum(torch.exp(-d2 / (2 * s * s)) for s in bws) / len(bws)
        total += k.sum().item()
    if drop_diagonal:
        total -= len(a)  # k(a, a) = 1 for every RBF kernel
    return total


def mmd(
    x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray, bandwidths: Sequence[float] | float | None = None
) -> float:
    """Unbiased MMD^2 between samples ``x`` (N, ...) and ``y`` (M, ...) with a mixture of RBF kernels."""
    x64, y64 = _flat64(x, "x"), _flat64(y, "y")
    if x64.shape[1] != y64.shape[1]:
        raise ShapeError(f"mmd: samples differ in dimension, {x64.shape[1]} vs {y64.shape[1]}")
    if bandwidths is None:
        med = median_bandwidth(x64, y64)
        bandwidths = [f * med for f in BANDWIDTH_FACTORS]
    bws = _check_bandwidths(bandwidths)
    m, n = len(x64), len(y64)
    kxx = _kernel_sum(x64, x64, bws, drop_diagonal=True) / (m * (m - 1))
    kyy = _kernel_sum(y64, y64, bws, drop_diagonal=True) / (n * (n - 1))
    kxy = _kernel_sum(x64, y64, bws, drop_diagonal=False) / (m * n)
    return kxx + kyy - 2 * kxy


def mean_log_likelihood(
    samples: torch.Tensor | np.ndarray, density: ToyDensity | str, min_log_prob: float | None = None
) -> float:
    """Mean of ``density.log_prob`` over ``samples`` (N, 2): how likely the samples are under the true density.

    For a density with bounded support (the checkerboard) one sample off the support makes the mean
    ``-inf``; ``min_log_prob`` floors each sample's log-density to report a finite figure instead.
    """
    density = toy_density(density) if isinstance(density, str) else density
    x = torch.as_tensor(samples).detach().cpu().to(torch.float64)
    if x.ndim != 2 or x.shape[1] != 2 or len(x) == 0:
        raise ShapeError(f"mean_log_likelihood: expected samples of shape (N, 2), N >= 1, got {tuple(x.shape)}")
    lp = density.log_prob(x)
    if min_log_prob is not None:
        lp = lp.clamp_min(min_log_prob)
    return lp.mean().item()
