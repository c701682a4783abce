"""Continuous flows and flow matching against closed forms."""

import math

import pytest
import torch
from torch import nn

from notelab.core.errors import ConfigError, ShapeError
from notelab.flows.continuous import ContinuousFlow, ContinuousFlowConfig, Solver
from notelab.flows.matching import (
    FlowMatchingLoss,
    LinearPath,
    OTPath,
    VPPath,
    gaussian_loss_floor,
    gaussian_marginal_velocity,
    gaussian_path_moments,
    ot_pairs,
)


class LinearField(ContinuousFlow):
    """v(x, t) = A x: x(1) = exp(A) x(0), so p_1 = N(0, exp(A) exp(A)^T)."""

    def __init__(self, a: torch.Tensor) -> None:
        super().__init__(ContinuousFlowConfig(sample_shape=(a.shape[0],), net_config={"hidden": 4, "n_layers": 1}))
        self.a = nn.Parameter(a)

    def forward(self, x, t):
        return x @ self.a.T


A = torch.tensor([[0.3, -0.5, 0.1], [0.2, -0.4, 0.0], [0.0, 0.6, 0.2]], dtype=torch.float64)


def _gaussian_log_prob(x):
    m = torch.linalg.matrix_exp(A)
    return torch.distributions.MultivariateNormal(torch.zeros(3, dtype=torch.float64), m @ m.T).log_prob(x)


@pytest.mark.parametrize("solver", [Solver("dopri5", rtol=1e-7, atol=1e-7), Solver("rk4", steps=40)])
def test_cnf_log_likelihood_of_a_linear_field_is_the_gaussian_closed_form(solver):
    model = LinearField(A.clone()).double()
    x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = model.log_prob(x, solver)
    torch.testing.assert_close(got, _gaussian_log_prob(x), atol=1e-5, rtol=0)


def test_hutchinson_log_likelihood_is_unbiased_within_its_standard_error():
    model = LinearField(A.clone()).double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        draws = torch.stack(
            [model.log_prob(x, Solver("rk4", steps=4), method="hutchinson", generator=g) for _ in range(100)]
        )
    err = (draws.mean(0) - _gaussian_log_prob(x)).abs()
    assert (err < 4 * draws.std(0) / math.sqrt(100) + 1e-6).all()
    assert (draws.std(0) > 0).all()  # the estimate really is random


def test_cnf_log_prob_is_differentiable_for_maximum_likelihood():
    model = LinearField(A.float())
    x = torch.randn(8, 3)
    loss = -model.log_prob(x, Solver("rk4", steps=4)).mean()
    loss.backward()
    assert model.a.grad is not None and model.a.grad.abs().sum() > 0


def test_sampling_the_analytic_marginal_field_between_gaussians_gives_the_target_moments():
    m, s = 2.0, 0.5

    class Analytic(ContinuousFlow):
        def forward(self, x, t):
            return gaussian_marginal_velocity(x, float(t), m, s)

    model = Analytic(ContinuousFlowConfig(sample_shape=(2,), net_config={"hidden": 4, "n_layers": 1})).double()
    x0 = torch.randn(40_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x1, nfe = model.sample(len(x0), Solver("rk4", steps=20), x0=x0)
    assert nfe == 80
    assert (x1.mean(0) - m).abs().max() < 0.02
    assert (x1.std(0) - s).abs().max() < 0.02


def test_cfm_loss_of_the_analytic_field_equals_the_floor_and_a_worse_field_is_above():
    m, s = 1.5, 0.5

    class Analytic(ContinuousFlow):
        def __init__(self, bias: float) -> None:
            super().__init__(ContinuousFlowConfig(sample_shape=(2,), net_config={"hidden": 4, "n_layers": 1}))
            self.bias = bias

        def forward(self, x, t):
            tt = t[:, None]
            return gaussian_marginal_velocity(x, tt, m, s) + self.bias

    loss = FlowMatchingLoss(LinearPath())
    batch = m + s * torch.randn(200_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    best, _ = loss(Analytic(0.0), batch, g)
    floor = gaussian_loss_floor(s)
    assert abs(float(best) - floor) < 0.01 * floor
    worse, _ = loss(Analytic(0.3), batch, g)
    assert float(worse) > floor + 0.3**2 * 0.9


@pytest.mark.parametrize("t", [0.0, 0.3, 0.9, 1.0])
def test_conditional_ot_path_samples_have_the_stated_mean_and_variance(t):
    sigma_min = 0.05
    x1 = torch.tensor([[1.0, -2.0]], dtype=torch.float64).expand(100_000, 2)
    x0 = torch.randn(100_000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    xt = OTPath(sigma_min).sample(x0, x1, torch.full((100_000,), t, dtype=torch.float64), torch.zeros_like(x0))
    std = 1 - (1 - sigma_min) * t
    torch.testing.assert_close(xt.mean(0), t * x1[0], atol=4 * std / math.sqrt(1e5) + 1e-12, rtol=0)
    torch.testing.assert_close(xt.std(0), torch.full((2,), std, dtype=torch.float64), atol=0.01 * std + 1e-12, rtol=0)


@pytest.mark.parametrize("path", [LinearPath(0.0), OTPath(0.01), VPPath()])
def test_path_velocity_is_the_time_derivative_of_the_path(path):
    g = torch.Generator().manual_seed(0)
    x0, x1, eps = (torch.randn(6, 3, dtype=torch.float64, generator=g) for _ in range(3))
    t = torch.rand(6, dtype=torch.float64, generator=g) * 0.9 + 0.05
    h = 1e-6
    fd = (path.sample(x0, x1, t + h, eps) - path.sample(x0, x1, t - h, eps)) / (2 * h)
    torch.testing.assert_close(path.velocity(x0, x1, t, eps), fd, atol=1e-6, rtol=1e-6)
    # data at t = 1, up to the path's small offset (sigma_min x0 for Lipman's OT path)
    ends = path.sample(x0, x1, torch.ones(6, dtype=torch.float64), torch.zeros_like(eps))
    torch.testing.assert_close(ends, x1, atol=0.05, rtol=0)


def test_ot_pairs_is_the_cheapest_permutation():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 2, generator=g), torch.randn(6, 2, generator=g)
    paired, _ = ot_pairs(x0, x1)
    best = min(float((x0[list(p)] - x1).pow(2).sum()) for p in __import__("itertools").permutations(range(6)))
    assert abs(float((paired - x1).pow(2).sum()) - best) < 1e-5
    assert sorted(map(tuple, paired.tolist())) == sorted(map(tuple, x0.tolist()))


def test_bad_input():
    model = ContinuousFlow(ContinuousFlowConfig(sample_shape=(2,)))
    with pytest.raises(ShapeError, match=r"expected x of shape \(B, 2\)"):
        model.log_prob(torch.zeros(3, 4))
    with pytest.raises(ShapeError, match="finite"):
        model.log_prob(torch.tensor([[math.inf, 0.0]]))
    with pytest.raises(ConfigError, match="n >= 1"):
        model.sample(0)
    with pytest.raises(ConfigError, match="unknown ODE solver"):
        Solver("leapfrog")


@pytest.mark.parametrize("t", [0.25, 0.5, 0.8])
def test_linear_path_marginal_moments_between_gaussians(t):
    m, s = 2.0, 0.5
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(200_000, dtype=torch.float64, generator=g)
    x1 = m + s * torch.randn(200_000, dtype=torch.float64, generator=g)
    xt = LinearPath().sample(x0, x1, torch.full((200_000,), t, dtype=torch.float64), torch.zeros_like(x0))
    mean, var = gaussian_path_moments(t, m, s)
    assert abs(float(xt.mean()) - mean) < 0.01
    assert abs(float(xt.var()) - var) < 0.01


def test_adjoint_gradient_equals_backprop_through_the_solver():
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    grads = []
    for adjoint in (False, True):
        model = LinearField(A.clone()).double()
        solver = Solver("dopri5", rtol=1e-5, atol=1e-5, adjoint=adjoint)
        (-model.log_prob(x, solver).sum()).backward()
        grads.append(model.a.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], atol=1e-3, rtol=1e-3)
