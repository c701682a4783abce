"""Frechet distance between two Gaussians fitted to feature sets (the distance behind FID).

Dowson & Landau (1982) give the 2-Wasserstein distance between N(mu1, S1) and N(mu2, S2);
Heusel et al. (2017, eq. 6) use it on Inception features as FID::

    d^2 = |mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))

``S1 S2`` is not symmetric, so ``sqrtm`` of it is fragile (scipy can return complex parts or
blow up for nearly singular covariances). With ``A = S1^(1/2)``, ``S1 S2 = A (A S2 A) A^-1`` is
similar to the symmetric PSD matrix ``A S2 A``, hence ``Tr((S1 S2)^(1/2)) = sum_i sqrt(lambda_i)``
over the eigenvalues of ``A S2 A``: two symmetric eigen-decompositions in float64, no inverse.
"""

from __future__ import annotations

import numpy as np
import torch

from notelab.core.errors import ShapeError


def _as_float64(a: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    a = np.asarray(a, dtype=np.float64)
    if not np.isfinite(a).all():
        raise ShapeError(f"{name}: expected finite values, found NaN or Inf")
    return a


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) become 0."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """``Tr((S1 S2)^(1/2))`` for symmetric PSD ``S1, S2``, as the eigenvalues of ``S1^(1/2) S2 S1^(1/2)``."""
    a = _sqrt_psd(sigma1)
    m = a @ sigma2 @ a
    w = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(w, 0, None)).sum())


def frechet_distance(
    mu1: torch.Tensor | np.ndarray,
    sigma1: torch.Tensor | np.ndarray,
    mu2: torch.Tensor | np.ndarray,
    sigma2: torch.Tensor | np.ndarray,
) -> float:
    """Squared Frechet distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)`` (the FID formula)."""
    mu1, mu2 = _as_float64(mu1, "mu1"), _as_float64(mu2, "mu2")
    sigma1, sigma2 = _as_float64(sigma1, "sigma1"), _as_float64(sigma2, "sigma2")
    if mu1.ndim != 1:
        raise ShapeError(f"frechet_distance: expected mu1 of shape (D,), got {mu1.shape}")
    d = mu1.shape[0]
    for name, a, shape in (("mu2", mu2, (d,)), ("sigma1", sigma1, (d, d)), ("sigma2", sigma2, (d, d))):
        if a.shape != shape:
            raise ShapeError(f"frechet_distance: expected {name} of shape {shape} (as mu1 is ({d},)), got {a.shape}")
    diff = mu1 - mu2
    fd = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
    # Round-off can push a distance of (nearly) zero slightly below it.
    return max(float(fd), 0.0)


def feature_statistics(features: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (ddof=1, as pytorch-fid) of ``features`` of shape ``(N, D)``, float64."""
    f = _as_float64(features, "features")
    if f.ndim != 2 or f.shape[0] < 2:
        raise ShapeError(f"features: expected shape (N, D) with N >= 2, got {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False).reshape(f.shape[1], f.shape[1])


def fd_from_features(a: torch.Tensor | np.ndarray, b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` (N, D) and ``b`` (M, D)."""
    mu1, s1 = feature_statistics(a)
    mu2, s2 = feature_statistics(b)
    if mu1.shape != mu2.shape:
        raise ShapeError(f"fd_from_features: feature sets differ in width, {mu1.shape[0]} vs {mu2.shape[0]}")
    return frechet_distance(mu1, s1, mu2, s2)
