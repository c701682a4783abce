"""Samplers driven by the exact optimal network for Gaussian data, where every answer is known.

For data x0 ~ N(mu, s^2 I), x_t ~ N(sqrt(a) mu, (a s^2 + 1 - a) I) with a = alpha_bar_t, and the
optimal eps-network (the minimiser of the simple loss, E[eps | x_t]) is

    eps*(x_t, t) = sqrt(1 - a) (x_t - sqrt(a) mu) / (a s^2 + 1 - a).

Both samplers are then affine maps of their Gaussian inputs, so their output moments follow from
pushing 0, 1 and unit noise through them; sample moments must match those within sampling error.

- DDIM (eta = 0) integrates the probability-flow ODE, which in xbar = x / sqrt(a),
  sigma = sqrt((1 - a) / a) reads d(xbar - mu)/d sigma = sigma / (s^2 + sigma^2) (xbar - mu), so
  the exact map from x_tau (at a = alpha_bar_tau) to x0 is
      x0 = mu + s (x_tau - sqrt(a) mu) / sqrt(a s^2 + 1 - a).
  DDIM's discretisation error against it falls like 1/S as the steps grow from 10 to 250.
- DDPM (1000 steps): its fixed reverse variances are not the optimal ones (Bao et al. 2022,
  "Analytic-DPM"), so with s^2 != 1 the chain's variance is biased by about 1.6% (fixed_small, low)
  or 0.3% (fixed_large, high); the mean is exact.
"""

from __future__ import annotations

import pytest
import torch

from notelab.diffusion import (
    PREDICTION_TYPES,
    NoiseSchedule,
    ddim_reconstruct,
    ddim_timesteps,
    ddpm_step,
    model_target,
    sample_ddim,
    sample_ddpm,
)

S_DATA = 0.5
N = 20_000


@pytest.fixture(scope="module")
def sched() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", 1000)


def optimal_model(sched: NoiseSchedule, mu: torch.Tensor, prediction_type: str = "epsilon"):
    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert bool((t == t[0]).all())
        a = sched.alpha_bar(int(t[0]))  # every sampler here calls with one timestep per batch
        eps = (1 - a) ** 0.5 * (x - a**0.5 * mu) / (a * S_DATA**2 + 1 - a)
        x0 = (x - (1 - a) ** 0.5 * eps) / a**0.5
        return model_target(x0, eps, a, prediction_type)

    return model


def moments(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x.mean(0), x.var(0)


@pytest.mark.parametrize("variance_type, var_bias", [("fixed_small", 0.02), ("fixed_large", 0.005)])
def test_ddpm_1000_steps_recovers_the_gaussian(sched, variance_type, var_bias):
    mu = torch.tensor([1.5, -0.5], dtype=torch.float64)
    model = optimal_model(sched, mu)
    # exact chain moments: rows (x=0, z=0), (x=1, z=0), (x=0, z=1) give b, A + b and std + b
    m, v = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    probe = torch.tensor([[0.0, 0.0], [1.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
    z = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    for t in range(999, -1, -1):
        out = ddpm_step(model(probe, torch.full((3,), t)), t, probe, sched, variance_type, noise=z)
        b, A, std = out[0], out[1] - out[0], out[2] - out[0]
        m, v = A * m + b, A**2 * v + std**2
    assert (m - mu).abs().max().item() < 2e-3
    assert (v / S_DATA**2 - 1).abs().max().item() < var_bias
    if variance_type == "fixed_large":
        return  # one Monte Carlo run is enough to tie the sampler to the exact moments
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = sample_ddpm(model, x_T, sched, variance_type, generator=torch.Generator().manual_seed(1))
    mean, var = moments(x)
    se_mean, se_var = (v / N) ** 0.5, v * (2 / N) ** 0.5
    assert bool(((mean - m).abs() < 4 * se_mean).all()), (mean, m)
    assert bool(((var - v).abs() < 4 * se_var).all()), (var, v)
    assert bool(((mean - mu).abs() < 4 * se_mean + 2e-3).all()) and bool(((var / S_DATA**2 - 1).abs() < 0.05).all())


def ddim_affine_map(sched, mu, steps, spacing, prediction_type="epsilon"):
    """(b, A): DDIM maps x_T to A x_T + b elementwise (images (B, 1, 2, 2), to exercise append_dims)."""
    probe = torch.stack([torch.zeros_like(mu), torch.ones_like(mu)])
    out = sample_ddim(optimal_model(sched, mu, prediction_type), probe, sched, steps, spacing=spacing,
                      prediction_type=prediction_type)  # fmt: skip
    return out[0], out[1] - out[0]


def exact_ode_map(sched, mu, steps, spacing):
    a = sched.alpha_bar(int(ddim_timesteps(sched.num_train_timesteps, steps, spacing)[0]))
    A = S_DATA / (a * S_DATA**2 + 1 - a) ** 0.5
    return mu - A * a**0.5 * mu, A


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "quadratic"])
def test_ddim_discretisation_error_shrinks_with_steps(sched, spacing):
    mu = torch.tensor([[[1.5, -0.5], [0.0, 2.0]]], dtype=torch.float64)  # (1, 2, 2)
    errors, var_errors = [], []
    for steps in (10, 50, 250):
        b, A = ddim_affine_map(sched, mu, steps, spacing)
        b_ode, A_ode = exact_ode_map(sched, mu, steps, spacing)
        errors.append(max((b - b_ode).abs().max().item(), (A - A_ode).abs().max().item()))
        var_errors.append((A**2 - S_DATA**2).abs().max().item())
    assert errors[2] < errors[1] < errors[0] and errors[2] < errors[0] / 10  # first order: ~1/S
    assert var_errors[2] < var_errors[1] < var_errors[0] and var_errors[2] < 0.01
    assert errors[2] < 0.01


def test_ddim_samples_match_the_gaussian(sched):
    mu = torch.tensor([1.5, -0.5], dtype=torch.float64)
    x_T = torch.randn(N, 2, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for steps, tol in ((10, 0.5), (250, 0.03)):  # relative variance error allowed: discretisation
        x = sample_ddim(optimal_model(sched, mu), x_T, sched, steps)
        b, A = ddim_affine_map(sched, mu, steps, "leading")
        mean, var = moments(x)
        # the samples are the affine map of x_T: their moments follow x_T's, up to float rounding
        torch.testing.assert_close(mean, A * x_T.mean(0) + b)
        torch.testing.assert_close(var, A**2 * x_T.var(0))
        se_mean, se_var = S_DATA / N**0.5, S_DATA**2 * (2 / N) ** 0.5
        assert bool(((mean - mu).abs() < 4 * se_mean + 0.01).all()), (steps, mean)
        assert bool(((var - S_DATA**2).abs() < 4 * se_var + tol * S_DATA**2).all()), (steps, var)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_ddim_is_the_same_map_whatever_the_network_predicts(sched, prediction_type):
    mu = torch.tensor([0.3, -1.0], dtype=torch.float64)
    b_eps, A_eps = ddim_affine_map(sched, mu, 20, "trailing")
    b, A = ddim_affine_map(sched, mu, 20, "trailing", prediction_type)
    torch.testing.assert_close((b, A), (b_eps, A_eps), atol=1e-10, rtol=1e-10)


def test_ddim_inversion_then_reconstruction_returns_x0(sched):
    mu = torch.tensor([1.5, -0.5], dtype=torch.float64)
    x0 = mu + S_DATA * torch.randn(2000, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    errors = []
    for steps in (10, 50, 250):
        x_T, x0_hat = ddim_reconstruct(optimal_model(sched, mu), x0, sched, steps)
        errors.append((x0_hat - x0).abs().mean().item())
        if steps == 250:
            # the encoder sends the data to (about) the prior N(0, I)
            mean, var = moments(x_T)
            assert mean.abs().max().item() < 0.1 and (var - 1).abs().max().item() < 0.1
    assert errors[2] < errors[1] < errors[0] and errors[2] < errors[0] / 10
    # first order in the step (the network sees x at the level it leaves, not the one it reaches)
    assert errors[2] < 0.02, errors
