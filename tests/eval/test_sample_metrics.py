"""MMD^2 (unbiased, mixture of RBF kernels) and log-likelihood under known toy densities."""

import numpy as np
import pytest
import torch
from sklearn.metrics.pairwise import rbf_kernel as sk_rbf_kernel

from notelab.core.errors import ConfigError, ShapeError
from notelab.data import toy_density
from notelab.eval import bits_per_dim, mean_log_likelihood, median_bandwidth, mmd, rbf_kernel


def test_rbf_kernel_matches_sklearn():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(5, 3))
    bws = [0.5, 2.0]
    expected = sum(sk_rbf_kernel(x, y, gamma=1 / (2 * s * s)) for s in bws) / 2
    np.testing.assert_allclose(rbf_kernel(x, y, bws).numpy(), expected, rtol=1e-10, atol=1e-12)


def test_unbiased_estimate_matches_the_formula():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(9, 2)) + 0.3
    k = lambda a, b: sk_rbf_kernel(a, b, gamma=0.5)  # noqa: E731  bandwidth 1
    kxx, kyy = k(x, x), k(y, y)
    expected = (kxx.sum() - np.trace(kxx)) / (6 * 5) + (kyy.sum() - np.trace(kyy)) / (9 * 8) - 2 * k(x, y).mean()
    assert mmd(x, y, bandwidths=1.0) == pytest.approx(expected, rel=1e-10)


def test_same_distribution_near_zero_different_large():
    d = toy_density("8gaussians")
    a = d.sample(1000, torch.Generator().manual_seed(0))
    b = d.sample(1000, torch.Generator().manual_seed(1))
    c = toy_density("moons").sample(1000, torch.Generator().manual_seed(2))
    same, diff = mmd(a, b), mmd(a, c)
    assert abs(same) < 0.002 and diff > 0.01
    assert diff > 20 * abs(same)
    # Images or any (N, ...) input are flattened.
    assert mmd(torch.zeros(4, 1, 2, 2), torch.ones(4, 1, 2, 2), bandwidths=[1.0]) > 0.5


def test_median_bandwidth():
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    assert median_bandwidth(x, x) == pytest.approx(5.0)


def test_mmd_bad_input():
    with pytest.raises(ShapeError, match="differ in dimension"):
        mmd(np.zeros((4, 2)), np.zeros((4, 3)))
    with pytest.raises(ShapeError, match="at least 2 samples"):
        mmd(np.zeros((1, 2)), np.zeros((4, 2)))
    with pytest.raises(ConfigError, match="positive bandwidths"):
        mmd(np.zeros((4, 2)), np.ones((4, 2)), bandwidths=[1.0, -1.0])


def test_mean_log_likelihood():
    d = toy_density("rings")
    x = d.sample(2000, torch.Generator().manual_seed(0))
    true_ll = mean_log_likelihood(x, d)
    assert true_ll == pytest.approx(d.log_prob(x.double()).mean().item())
    assert mean_log_likelihood(x, "rings") == pytest.approx(true_ll)
    assert mean_log_likelihood(torch.randn(2000, 2) * 2, d) < true_ll - 1
    board = toy_density("checkerboard")
    off = torch.tensor([[0.5, 0.5], [-0.5, 0.5]])  # black, white
    assert mean_log_likelihood(off, board) == -np.inf
    assert mean_log_likelihood(off, board, min_log_prob=-10.0) == pytest.approx((-np.log(8) - 10) / 2)
    with pytest.raises(ShapeError, match=r"shape \(N, 2\)"):
        mean_log_likelihood(torch.zeros(3, 3), d)


def test_bits_per_dim_of_uniform_model_is_eight():
    # A uniform density on [-1, 1]^D has log p = -D log 2; on 8-bit data that is exactly 8 bits/dim.
    d = 12
    assert bits_per_dim(-d * np.log(2.0), d) == pytest.approx(8.0)
    lp = torch.tensor([-d * np.log(2.0), 0.0])
    np.testing.assert_allclose(bits_per_dim(lp, d).numpy(), [8.0, 7.0])
    with pytest.raises(ConfigError):
        bits_per_dim(0.0, 0)
