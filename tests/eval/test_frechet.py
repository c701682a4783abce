"""Frechet distance: closed forms, parity with scipy's sqrtm formula, stability, bad input."""

import numpy as np
import pytest
import scipy.linalg
import torch

from notelab.core.errors import ShapeError
from notelab.eval import fd_from_features, feature_statistics, frechet_distance


def scipy_fd(mu1, s1, mu2, s2):
    """The pytorch-fid formula: sqrtm of the (non-symmetric) product."""
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def random_spd(rng, d):
    a = rng.normal(size=(d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


@pytest.mark.parametrize("d", [1, 5, 32])
def test_matches_scipy_sqrtm(d):
    rng = np.random.default_rng(d)
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = random_spd(rng, d), random_spd(rng, d)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(scipy_fd(mu1, s1, mu2, s2), rel=1e-8, abs=1e-9)


def test_closed_forms():
    mu = np.array([1.0, -2.0, 0.5])
    s = np.diag([1.0, 2.0, 3.0])
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-12)
    # Equal covariances: only the means differ.
    assert frechet_distance(mu, s, mu + 1, s) == pytest.approx(3.0)
    # Commuting (diagonal) covariances: sum of (sqrt(a) - sqrt(b))^2.
    t = np.diag([4.0, 2.0, 0.0])
    expected = (1 - 2) ** 2 + 0 + (np.sqrt(3) - 0) ** 2
    assert frechet_distance(mu, s, mu, t) == pytest.approx(expected)


def test_stable_for_singular_covariances():
    # Rank-deficient covariances (more dims than samples) make sqrtm(S1 S2) ill-conditioned; ours stays real.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(10, 64)), rng.normal(size=(10, 64)) + 0.5
    fd = fd_from_features(a, b)
    assert np.isfinite(fd) and fd > 0
    assert fd_from_features(a, a) == pytest.approx(0.0, abs=1e-8)


def test_fd_from_features_matches_gaussian_statistics():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4000, 3))
    b = rng.normal(size=(4000, 3)) * 2 + 1
    # N(0, I) vs N(1, 4 I): |1|^2 * 3 + 3 * (1 - 2)^2 = 6
    assert fd_from_features(torch.from_numpy(a), b) == pytest.approx(6.0, rel=0.05)
    mu, cov = feature_statistics(a)
    np.testing.assert_allclose(cov, np.cov(a, rowvar=False))
    np.testing.assert_allclose(mu, a.mean(0))


def test_bad_input():
    with pytest.raises(ShapeError, match=r"expected sigma2 of shape \(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))
    with pytest.raises(ShapeError, match="differ in width"):
        fd_from_features(np.zeros((5, 3)), np.zeros((5, 4)))
    with pytest.raises(ShapeError, match="N >= 2"):
        fd_from_features(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ShapeError, match="finite"):
        fd_from_features(np.full((4, 2), np.nan), np.zeros((5, 2)))
