"""Score SDEs on Gaussian data, where the score, the marginals and the likelihood are all analytic.

For x0 ~ N(mu, diag(v0)) and x_t | x0 ~ N(m(t) x0, s(t)^2 I), p_t = N(m mu, diag(m^2 v0 + s^2)) and
    score(x, t) = -(x - m mu) / (m^2 v0 + s^2).
Driven by it, the probability-flow ODE's log-likelihood must equal log N(x; mu, v0) (up to the
O(eps) of starting at t = eps and the prior mismatch at T, both far below the tolerance), and every
sampler must return the data's moments.
"""

from __future__ import annotations

import math

import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.diffusion.likelihood import log_likelihood
from notelab.diffusion.samplers import sample_ode, sample_sde
from notelab.diffusion.sde import VESDE, VPSDE, SubVPSDE

MU = torch.tensor([1.0, -0.5], dtype=torch.float64)
V0 = torch.tensor([0.25, 2.25], dtype=torch.float64)
SDES = {"ve": VESDE(sigma_min=0.01, sigma_max=100.0), "vp": VPSDE(), "subvp": SubVPSDE()}


def gaussian_score(sde):
    def score(x, t):
        m, s = sde.marginal_coefs(t.to(torch.float64))
        m, s = m[:, None], s[:, None]
        return (-(x - m * MU) / (m**2 * V0 + s**2)).to(x.dtype)

    return score


def true_logp(x):
    return (-0.5 * ((x - MU) ** 2 / V0 + torch.log(2 * math.pi * V0))).sum(1)


@pytest.mark.parametrize("name", list(SDES))
def test_exact_likelihood_matches_the_true_density(name):
    # VE's prior N(0, sigma_max^2) ignores the data mean: with sigma_max = 100 that alone costs
    # ~0.012 nats/dim here, so the 1e-2 bound is checked at sigma_max = 1000 (0.0012)
    sde = VESDE(sigma_min=0.01, sigma_max=1000.0) if name == "ve" else SDES[name]
    x = MU + V0.sqrt() * torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    res = log_likelihood(gaussian_score(sde), sde, x, rtol=1e-6, atol=1e-6)
    err_per_dim = (res.log_p - true_logp(x)).abs().max().item() / 2
    assert err_per_dim < 1e-2, err_per_dim
    assert res.nfe > 10 and res.z.shape == x.shape
    # with the true p_T in place of the prior, only the solver's error is left
    m, s = sde.marginal_coefs(torch.ones(1, dtype=torch.float64))
    v_T = m**2 * V0 + s**2
    log_pT = (-0.5 * ((res.z - m * MU) ** 2 / v_T + torch.log(2 * math.pi * v_T))).sum(1)
    exact = log_pT + res.log_p - sde.prior_logp(res.z)
    assert (exact - true_logp(x)).abs().max().item() < 1e-3


def test_hutchinson_likelihood_is_unbiased():
    sde = SDES["vp"]
    x = torch.tensor([[0.3, 1.2]], dtype=torch.float64)
    n = 200
    res = log_likelihood(
        gaussian_score(sde),
        sde,
        x.expand(n, 2),
        rtol=1e-5,
        atol=1e-5,
        divergence="hutchinson",
        generator=torch.Generator().manual_seed(1),
        distribution="gaussian",
    )
    se = res.log_p.std() / n**0.5
    assert se > 1e-3  # the estimate does vary from probe to probe
    assert abs(res.log_p.mean() - true_logp(x)[0]) < 4 * se


def _check_moments(x, tol_mean=4.0, tol_var=4.0):
    n = x.shape[0]
    mean, var = x.mean(0), x.var(0)
    se_mean, se_var = (V0 / n).sqrt(), V0 * (2 / n) ** 0.5
    assert ((mean - MU).abs() < tol_mean * se_mean).all(), (mean, MU)
    assert ((var - V0).abs() < tol_var * se_var).all(), (var, V0)
    cov = torch.cov(x.T)[0, 1]  # the data's dimensions are independent; se of a covariance ~ sqrt(v1 v2 / n)
    assert abs(cov) < tol_mean * (V0[0] * V0[1] / n).sqrt(), cov


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("sampler, steps", [("em", 400), ("pc", 400), ("ode", 0)])
def test_samplers_recover_the_gaussian(name, sampler, steps):
    sde = SDES[name]
    n = 4000
    g = torch.Generator().manual_seed(2)
    if sampler == "ode":
        x_T = sde.prior_sampling((n, 2), g, dtype=torch.float64)
        res = sample_ode(gaussian_score(sde), sde, x_T, rtol=1e-5, atol=1e-5, denoise=True)
    else:
        res = sample_sde(gaussian_score(sde), sde, (n, 2), sampler, steps, g, dtype=torch.float64)
        assert res.nfe == steps * (2 if sampler == "pc" else 1)
    # the reverse SDE's Euler-Maruyama bias is O(1/steps); 400 steps keep it under the sampling error
    _check_moments(res.x)


@pytest.mark.parametrize("name", list(SDES))
def test_marginal_prob_matches_simulated_forward_paths(name):
    sde = SDES[name]
    n, steps, t_end = 20000, 500, 0.6
    g = torch.Generator().manual_seed(3)
    x0 = MU + V0.sqrt() * torch.randn(n, 2, dtype=torch.float64, generator=g)
    x = x0.clone()
    for k in range(steps):  # forward Euler-Maruyama, independent of the code under test's samplers
        t = torch.full((n,), k * t_end / steps, dtype=torch.float64)
        f, gg = sde.sde(x, t)
        x = (
            x
            + f * (t_end / steps)
            + gg[:, None] * math.sqrt(t_end / steps) * torch.randn(x.shape, generator=g, dtype=torch.float64)
        )
    mean, std = sde.marginal_prob(x0, t_end)
    resid = x - mean  # ~ N(0, s^2) given x0
    s2 = std[0] ** 2
    assert abs(resid.mean().item()) < 4 * (s2 / (2 * n)) ** 0.5
    assert abs(resid.var().item() / s2.item() - 1) < 4 * (2 / (2 * n)) ** 0.5 + 2 / steps


def test_ve_prior_and_vp_variance_bound():
    t = torch.linspace(0.01, 1, 50, dtype=torch.float64)
    _, s_vp = SDES["vp"].marginal_coefs(t)
    _, s_sub = SDES["subvp"].marginal_coefs(t)
    assert bool((s_sub < s_vp).all())  # sub-VP's variance is bounded by VP's (eq. 34)
    _, s_ve = SDES["ve"].marginal_coefs(torch.ones(1, dtype=torch.float64))
    assert abs(s_ve.item() - 100.0) < 1e-4


def _bad_score(kind):
    def score(x, t):
        if kind == "shape":
            return x[:, :1]
        return torch.full_like(x, float("nan"))

    return score


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: sample_sde(_bad_score("shape"), VPSDE(), (4, 2), "em", 5), ShapeError, r"\(4, 2\).*\(4, 1\)"),
        (lambda: sample_sde(_bad_score("nan"), VPSDE(), (4, 2), "pc", 50), ShapeError, "NaN"),
        (lambda: sample_sde(_bad_score("nan"), VPSDE(), (4, 2), "rd", 5), ConfigError, "beta_max / steps"),
        (lambda: sample_sde(gaussian_score(VPSDE()), VPSDE(), (4, 2), "em", 5, eps=1.5), ConfigError, "1.5"),
        (lambda: sample_sde(gaussian_score(VPSDE()), VPSDE(), (4, 2), "heun", 5), ConfigError, "heun"),
        (lambda: sample_ode(gaussian_score(VPSDE()), VPSDE(), torch.zeros(4, 2), rtol=0.0), ConfigError, "rtol.*0.0"),
        (
            lambda: log_likelihood(gaussian_score(VPSDE()), VPSDE(), torch.zeros(4, 2), atol=-1.0),
            ConfigError,
            "atol.*-1.0",
        ),
        (lambda: log_likelihood(gaussian_score(VPSDE()), VPSDE(), torch.zeros(4, 2), eps=0.0), ConfigError, "eps"),
        (lambda: VESDE(sigma_min=1.0, sigma_max=0.5), ConfigError, "sigma_max"),
        (lambda: VPSDE(beta_min=-1.0), ConfigError, "beta_min.*-1.0"),
        (lambda: VPSDE().marginal_prob(torch.zeros(2, 2), 1.5), ConfigError, "1.5"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


def test_ddpm_bound_is_above_and_near_the_true_nll():
    from notelab.diffusion import NoiseSchedule
    from notelab.diffusion.likelihood import ddpm_nll_bound

    sched = NoiseSchedule.from_name("linear", 1000)
    s0 = 0.5

    def model(x, t):  # the optimal eps-network for x0 ~ N(MU, s0^2 I)
        a = sched.alpha_bar(int(t[0]))
        return (1 - a) ** 0.5 * (x - a**0.5 * MU) / (a * s0**2 + 1 - a)

    x0 = MU + s0 * torch.randn(2000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nll = (0.5 * ((x0 - MU) ** 2 / s0**2 + math.log(2 * math.pi * s0**2))).sum(1)
    bound = ddpm_nll_bound(model, x0, sched, generator=torch.Generator().manual_seed(1))
    gap = bound - nll
    se = gap.std() / len(gap) ** 0.5
    assert gap.mean() > -4 * se  # a bound: never below the NLL beyond sampling error
    assert gap.mean() < 0.05 + 4 * se  # and tight for the optimal network (fixed variances cost a little)
    # a worse network loosens it (same draws of x_t: a paired difference)
    worse = ddpm_nll_bound(lambda x, t: model(x, t) * 0.8, x0, sched, generator=torch.Generator().manual_seed(1))
    d = worse - bound
    assert d.mean() > 4 * d.std() / len(d) ** 0.5
