"""Toy 2-D densities: log_prob is normalised and matches the sampler's histogram."""

import math

import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.data import TOY_DENSITIES, ToyDensity, toy_density
from notelab.data.toy import simpson_weights

NAMES = sorted(TOY_DENSITIES)
HALF = 4.0  # every density has (almost) all its mass in [-4, 4]^2


def grid(m: int) -> tuple[torch.Tensor, float]:
    """Cell centres of an m x m grid on [-HALF, HALF]^2 (cell edges fall on the checkerboard's edges)."""
    h = 2 * HALF / m
    g = torch.linspace(-HALF + h / 2, HALF - h / 2, m, dtype=torch.float64)
    xx, yy = torch.meshgrid(g, g, indexing="ij")
    return torch.stack([xx.ravel(), yy.ravel()], dim=1), h


@pytest.mark.parametrize("name", NAMES)
def test_density_integrates_to_one(name):
    density = toy_density(name)
    points, h = grid(100)
    mass = density.log_prob(points).exp().sum().item() * h * h
    assert mass == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("name", NAMES)
def test_histogram_of_samples_matches_density(name):
    density = toy_density(name)
    bins, sub = 20, 4  # 20x20 histogram bins, each integrated on a 4x4 sub-grid
    points, h = grid(bins * sub)
    cell_mass = density.log_prob(points).exp().reshape(bins, sub, bins, sub).sum(dim=(1, 3)) * h * h
    x = density.sample(40_000, torch.Generator().manual_seed(1)).double()
    hist = torch.histogramdd(x, bins=[bins, bins], range=[-HALF, HALF, -HALF, HALF]).hist / len(x)
    tv = 0.5 * (hist - cell_mass).abs().sum().item()
    # Sampling noise alone gives TV ~0.02 here; another density gives > 0.3.
    assert tv < 0.05
    other = toy_density(NAMES[(NAMES.index(name) + 1) % len(NAMES)])
    other_mass = other.log_prob(points).exp().reshape(bins, sub, bins, sub).sum(dim=(1, 3)) * h * h
    assert 0.5 * (hist - other_mass).abs().sum().item() > 0.2


def test_eight_gaussians_log_prob_is_the_mixture_formula():
    d = toy_density("8gaussians")
    x = torch.tensor([[2.0, 0.0], [0.3, -0.1]], dtype=torch.float64)
    centres = [(2 * math.cos(2 * math.pi * k / 8), 2 * math.sin(2 * math.pi * k / 8)) for k in range(8)]
    for row, lp in zip(x.tolist(), d.log_prob(x).tolist()):
        p = sum(math.exp(-((row[0] - a) ** 2 + (row[1] - b) ** 2) / (2 * 0.2**2)) for a, b in centres)
        assert lp == pytest.approx(math.log(p / 8 / (2 * math.pi * 0.2**2)), rel=1e-9)


def test_checkerboard_is_uniform_on_black_squares_and_zero_elsewhere():
    d = toy_density("checkerboard")
    lp = d.log_prob(torch.tensor([[-1.5, -1.5], [-0.5, -1.5], [0.5, 0.5], [5.0, 0.0]]))
    assert lp[0].item() == pytest.approx(-math.log(8.0))
    assert lp[2].item() == pytest.approx(-math.log(8.0))
    assert lp[1].item() == -math.inf and lp[3].item() == -math.inf
    assert torch.isfinite(d.log_prob(d.sample(1000))).all()


def test_rings_radial_density_is_gaussian_over_2_pi_r():
    d = toy_density("rings")
    r, R, s = 1.03, 1.0, d.std
    lp = d.log_prob(torch.tensor([[0.0, r]], dtype=torch.float64)).item()
    w = R / sum(d.radii)
    expected = w * math.exp(-0.5 * ((r - R) / s) ** 2) / (s * math.sqrt(2 * math.pi)) / (2 * math.pi * r)
    assert lp == pytest.approx(math.log(expected), rel=1e-6)  # other rings contribute < 1e-20 here


def test_curve_quadrature_converged():
    d = toy_density("swissroll")
    x = d.sample(300, torch.Generator().manual_seed(0)).double()
    fine = toy_density("swissroll")
    fine.intervals = 8000
    assert (d.log_prob(x) - fine.log_prob(x)).abs().max().item() < 1e-3


def test_simpson_weights_integrate_cubics_exactly():
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    assert (simpson_weights(10) * t**3).sum().item() == pytest.approx(0.25, abs=1e-14)
    with pytest.raises(ConfigError):
        simpson_weights(7)


@pytest.mark.parametrize("name", NAMES)
def test_sampling_is_seeded(name):
    d = toy_density(name)
    a = d.sample(64, torch.Generator().manual_seed(3))
    b = d.sample(64, torch.Generator().manual_seed(3))
    assert a.shape == (64, 2) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, d.sample(64, torch.Generator().manual_seed(4)))


def test_bad_input():
    with pytest.raises(ConfigError, match="unknown toy density 'spiral'; known: 8gaussians"):
        toy_density("spiral")
    with pytest.raises(ShapeError, match=r"expected points of shape \(n, 2\), got \(4, 3\)"):
        toy_density("moons").log_prob(torch.zeros(4, 3))

    class NoDensity(ToyDensity):
        name = "blob"
        has_log_prob = False

    with pytest.raises(ConfigError, match="no known log-density"):
        NoDensity().log_prob(torch.zeros(1, 2))
