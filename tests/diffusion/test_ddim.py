"""DDIM: timestep subsequences, the generalised step (eq. 12, 16), thresholding, slerp."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.diffusion import (
    NoiseSchedule,
    ddim_sigma,
    ddim_step,
    ddim_timesteps,
    ddpm_step,
    dynamic_threshold,
    posterior_coefficients,
    predict_x0_eps,
    sample_ddim,
    slerp,
)


@pytest.fixture
def sched() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", 1000)


def test_timesteps_known_values():
    assert ddim_timesteps(1000, 10, "leading").tolist() == list(range(900, -1, -100))
    assert ddim_timesteps(1000, 10, "leading", steps_offset=1).tolist() == list(range(901, 0, -100))
    assert ddim_timesteps(1000, 10, "trailing").tolist() == list(range(999, 98, -100))
    assert ddim_timesteps(1000, 10, "linspace").tolist() == list(range(999, -1, -111))
    # the DDIM paper's code: seq = [int(s) for s in np.linspace(0, np.sqrt(0.8 * T), S) ** 2]
    paper = [int(s) for s in np.linspace(0, np.sqrt(800), 10) ** 2]
    assert ddim_timesteps(1000, 10, "quadratic").tolist() == paper[::-1]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace", "quadratic"])
@pytest.mark.parametrize("T, S", [(1000, 1), (1000, 7), (1000, 50), (1000, 333), (1000, 1000), (20, 20), (37, 5)])
def test_timesteps_are_s_distinct_descending_int64_in_range(spacing, T, S):
    ts = ddim_timesteps(T, S, spacing)
    assert ts.dtype == torch.int64 and ts.shape == (S,)
    assert ts.min().item() >= 0 and ts.max().item() <= T - 1
    assert bool((ts.diff() < 0).all())
    if S == T:
        assert ts.tolist() == list(range(T - 1, -1, -1))


def test_timesteps_bad_input():
    for steps in (0, 1001, -3):
        with pytest.raises(
            ConfigError, match=rf"steps: expected an int in \[1, num_train_timesteps=1000\], got {steps}"
        ):
            ddim_timesteps(1000, steps)
    with pytest.raises(ConfigError, match="steps"):
        ddim_timesteps(1000, 2.5)
    with pytest.raises(ConfigError, match="unknown timestep spacing 'uniform'; known: leading, linspace, quadratic"):
        ddim_timesteps(1000, 10, "uniform")
    with pytest.raises(ConfigError, match="steps_offset"):
        ddim_timesteps(1000, 10, "leading", steps_offset=100)
    with pytest.raises(ConfigError, match=r"\[0, num_train_timesteps=1000\), got -1\.\.899"):
        ddim_timesteps(1000, 10, "leading", steps_offset=-1)


@pytest.mark.parametrize("t, t_prev", [(1, 0), (500, 499), (999, 899), (640, 20), (5, -1)])
def test_eta_one_sigma_is_the_ddpm_posterior_variance(sched, t, t_prev):
    a, a_p = sched.alpha_bar(t), sched.alpha_bar(t_prev)
    _, _, beta_tilde = posterior_coefficients(a, a_p)
    assert ddim_sigma(a, a_p, 1.0) ** 2 == pytest.approx(beta_tilde, rel=1e-12, abs=1e-300)
    if t_prev == t - 1 and t_prev >= 0:
        assert ddim_sigma(a, a_p, 1.0) ** 2 == pytest.approx(sched.posterior_variance[t].item(), rel=1e-9)
    assert ddim_sigma(a, a_p, 0.5) == pytest.approx(0.5 * ddim_sigma(a, a_p, 1.0))


@pytest.mark.parametrize("t, t_prev", [(1, 0), (500, 499), (999, 899), (640, 20)])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eta_one_step_is_the_ddpm_ancestral_step(sched, t, t_prev, prediction_type):
    """With eta = 1 the DDIM step is the DDPM posterior mean plus beta_tilde noise (DDIM sec. 4.1)."""
    g = torch.Generator().manual_seed(t)
    out, x_t, z = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    ddim = ddim_step(out, t, t_prev, x_t, sched, 1.0, prediction_type, z)
    ddpm = ddpm_step(out, t, x_t, sched, "fixed_small", prediction_type, z, t_prev=t_prev)
    torch.testing.assert_close(ddim, ddpm, atol=1e-10, rtol=1e-10)


def test_eta_zero_is_deterministic_and_the_last_step_returns_x0(sched):
    g = torch.Generator().manual_seed(0)
    out, x_t, z = (torch.randn(4, 3, generator=g, dtype=torch.float64) for _ in range(3))
    assert torch.equal(ddim_step(out, 500, 400, x_t, sched, noise=z), ddim_step(out, 500, 400, x_t, sched))
    x0, _ = predict_x0_eps(out, x_t, sched.alpha_bar(20), "epsilon")
    for eta in (0.0, 1.0):
        torch.testing.assert_close(ddim_step(out, 20, -1, x_t, sched, eta, noise=z), x0)
    with pytest.raises(ConfigError, match="eta >= 0, got -0.5"):
        ddim_step(out, 20, 10, x_t, sched, -0.5)


def test_eta_zero_step_keeps_eps_and_moves_x0_to_the_new_noise_level(sched):
    """eq. 12 with sigma = 0: x_t' = sqrt(a') x0 + sqrt(1 - a') eps for the same (x0, eps)."""
    x0, eps = torch.randn(3, 2, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    a, a_p = sched.alpha_bar(700), sched.alpha_bar(300)
    x_t = a**0.5 * x0 + (1 - a) ** 0.5 * eps
    torch.testing.assert_close(ddim_step(eps, 700, 300, x_t, sched), a_p**0.5 * x0 + (1 - a_p) ** 0.5 * eps)


def test_per_sample_timesteps_equal_one_call_per_sample(sched):
    g = torch.Generator().manual_seed(0)
    out, x_t, z = (torch.randn(3, 2, 4, 4, generator=g) for _ in range(3))
    t, t_prev = torch.tensor([999, 300, 20]), torch.tensor([899, 250, -1])
    batched = ddim_step(out, t, t_prev, x_t, sched, 0.7, "sample", z)
    for i in range(3):
        one = ddim_step(out[i : i + 1], int(t[i]), int(t_prev[i]), x_t[i : i + 1], sched, 0.7, "sample", z[i : i + 1])
        torch.testing.assert_close(batched[i : i + 1], one)


def test_dynamic_thresholding_bounds():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 3, 8, 8, generator=g) * torch.tensor([0.2, 2.0, 5.0, 50.0]).reshape(4, 1, 1, 1)
    out = dynamic_threshold(x0, ratio=0.995, max_value=10.0)
    assert out.shape == x0.shape and out.abs().max().item() <= 1.0 + 1e-6
    # a sample already inside [-1, 1] is left alone (s is clamped below at 1)
    assert x0[0].abs().max() < 1
    torch.testing.assert_close(out[0], x0[0])
    # otherwise it is clipped at s = the 99.5% quantile of |x0| and divided by s
    s = torch.quantile(x0[1].abs().flatten(), 0.995)
    torch.testing.assert_close(out[1], x0[1].clamp(-s, s) / s)
    # s is capped at max_value, so a huge sample saturates at +-1 more than a moderate one
    s3 = torch.tensor(10.0)
    torch.testing.assert_close(out[3], x0[3].clamp(-s3, s3) / s3)
    assert (out[3].abs() == 1).float().mean() > (out[1].abs() >= 1 - 1e-6).float().mean()
    # bf16 input comes back in bf16
    assert dynamic_threshold(x0.bfloat16()).dtype == torch.bfloat16


def test_clip_and_threshold_in_the_step(sched):
    x_t = torch.full((2, 3, 2, 2), 4.0)
    out = torch.zeros_like(x_t)
    assert ddim_step(out, 10, -1, x_t, sched).min().item() > 3.9
    assert ddim_step(out, 10, -1, x_t, sched, clip_sample=True).max().item() == pytest.approx(1.0)
    assert ddim_step(out, 10, -1, x_t, sched, thresholding=True).max().item() == pytest.approx(1.0)
    # use_clipped_model_output re-derives eps from the clipped x0 (GLIDE / diffusers' option)
    plain = ddim_step(out, 500, 400, x_t, sched, clip_sample=True)
    clipped_eps = ddim_step(out, 500, 400, x_t, sched, clip_sample=True, use_clipped_model_output=True)
    assert not torch.allclose(plain, clipped_eps)


def test_sample_ddim_calls_the_model_at_the_subsequence(sched):
    seen = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled() and t.dtype == torch.int64 and t.shape == (x.shape[0],)
        seen.append(int(t[0]))
        return 0.5 * x

    x_T = torch.randn(3, 2)
    out = sample_ddim(model, x_T, sched, 10, spacing="trailing")
    assert seen == ddim_timesteps(1000, 10, "trailing").tolist() and out.shape == x_T.shape
    seen.clear()
    a = sample_ddim(model, x_T, sched, 5, eta=1.0, generator=torch.Generator().manual_seed(0))
    b = sample_ddim(model, x_T, sched, 5, eta=1.0, generator=torch.Generator().manual_seed(0))
    c = sample_ddim(model, x_T, sched, 5, eta=1.0, generator=torch.Generator().manual_seed(1))
    assert len(seen) == 15 and torch.equal(a, b) and not torch.allclose(a, c)
    with pytest.raises(ConfigError, match="got 1001"):
        sample_ddim(model, x_T, sched, 1001)
    with pytest.raises(ShapeError, match="batch"):
        sample_ddim(model, torch.randn(3), sched, 10)


def test_slerp():
    g = torch.Generator().manual_seed(0)
    z0, z1 = (
        torch.randn(3, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(3, 8, 8, generator=g, dtype=torch.float64),
    )
    z1 = z1 * z0.norm() / z1.norm()  # equal norms: the path is an arc of one sphere
    torch.testing.assert_close(slerp(z0, z1, 0.0), z0)
    torch.testing.assert_close(slerp(z0, z1, 1.0), z1)
    path = slerp(z0, z1, torch.linspace(0, 1, 5, dtype=torch.float64))
    assert path.shape == (5, 3, 8, 8)
    torch.testing.assert_close(path[2], slerp(z0, z1, 0.5))
    # on the great circle: equal angle steps at a constant norm
    cos = [float((path[i].flatten() @ path[i + 1].flatten()) / (path[i].norm() * path[i + 1].norm())) for i in range(4)]
    assert max(cos) - min(cos) < 1e-9
    norms = path.flatten(1).norm(dim=1)
    torch.testing.assert_close(norms, torch.full_like(norms, z0.norm().item()))
    # unequal norms: slerp of the directions, not a linear blend (which would shrink the norm)
    w = 3 * torch.randn(3, 8, 8, generator=g, dtype=torch.float64)
    assert slerp(z0, w, 0.5).norm() > (0.5 * z0 + 0.5 * w).norm()
    # orthogonal unit vectors: the midpoint is (e0 + e1) / sqrt(2)
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    torch.testing.assert_close(slerp(e0, e1, 0.5), torch.tensor([1.0, 1.0]) / math.sqrt(2))
    torch.testing.assert_close(slerp(e0, 2 * e0, 0.5), 1.5 * e0)  # parallel: linear
    with pytest.raises(ShapeError, match="same shape"):
        slerp(e0, torch.zeros(3), 0.5)
