"""Beta schedules against their closed forms, and the eps / x0 / v conversions."""

from __future__ import annotations

import math

import pytest
import torch

from notelab.core.errors import ConfigError
from notelab.diffusion import (
    PREDICTION_TYPES,
    NoiseSchedule,
    eps_from_x0,
    model_target,
    predict_x0_eps,
    score_from_eps,
    v_from_x0_eps,
    x0_from_eps,
)
from notelab.diffusion.schedules import cosine, squaredcos_cap_v2


def test_linear_is_linear_and_alphas_cumprod_is_the_product():
    s = NoiseSchedule.from_name("linear", 1000, 1e-4, 0.02)
    assert s.num_train_timesteps == 1000 and s.betas.dtype == torch.float64
    assert s.betas[0].item() == pytest.approx(1e-4) and s.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(s.betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))
    prod = 1.0
    for t in (0, 1, 500, 999):
        prod = math.prod(1 - b for b in s.betas[: t + 1].tolist())
        assert s.alphas_cumprod[t].item() == pytest.approx(prod, rel=1e-12)
    assert torch.equal(s.alphas, 1 - s.betas)


def test_scaled_linear_is_linear_in_sqrt_beta():
    s = NoiseSchedule.from_name("scaled_linear", 100, 0.00085, 0.012)
    root = s.betas.sqrt()
    assert root[0].item() == pytest.approx(0.00085**0.5) and root[-1].item() == pytest.approx(0.012**0.5)
    assert root.diff().diff().abs().max().item() < 1e-15
    assert s.betas.diff().diff().min().item() > 0  # strictly convex in beta, unlike "linear"


def test_cosine_follows_nichol_dhariwal_eq17_and_is_clipped():
    T, s_ = 1000, 0.008
    sched = NoiseSchedule.from_name("cosine", T)
    assert sched.name == "squaredcos_cap_v2" and torch.equal(sched.betas, squaredcos_cap_v2(T))
    assert cosine is squaredcos_cap_v2

    def f(t: float) -> float:
        return math.cos((t / T + s_) / (1 + s_) * math.pi / 2) ** 2

    # alpha_bar_t = f(t + 1) / f(0) wherever no beta was clipped
    unclipped = int((sched.betas < 0.999).sum())
    assert unclipped >= T - 2
    for t in (0, 10, 500, 900, unclipped - 1):
        assert sched.alphas_cumprod[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-9)
    assert sched.betas.max().item() == pytest.approx(0.999)
    assert sched.betas[-1].item() == pytest.approx(0.999)


def test_derived_quantities():
    s = NoiseSchedule.from_name("linear", 50)
    a, a_prev = s.alphas_cumprod, s.alphas_cumprod_prev
    assert a_prev[0].item() == 1.0 and torch.equal(a_prev[1:], a[:-1])
    assert torch.allclose(s.posterior_variance, s.betas * (1 - a_prev) / (1 - a))
    assert s.posterior_variance[0].item() == 0.0
    assert torch.allclose(s.sqrt_alphas_cumprod**2 + s.sqrt_one_minus_alphas_cumprod**2, torch.ones(50, dtype=a.dtype))
    assert torch.allclose(s.snr, a / (1 - a))
    assert s.snr.diff().max().item() < 0  # SNR falls monotonically with t


def test_alpha_bar_lookup_int_and_tensor_agree_and_minus_one_is_one():
    s = NoiseSchedule.from_name("linear", 50)
    assert s.alpha_bar(-1) == 1.0 and s.alpha_bar(3) == s.alphas_cumprod[3].item()
    t = torch.tensor([-1, 0, 7, 49])
    x = torch.zeros(4, 3, 2, 2)
    a = s.alpha_bar(t, x)
    assert a.shape == (4, 1, 1, 1) and a.dtype == torch.float64
    assert a.flatten().tolist() == [1.0] + [s.alpha_bar(i) for i in (0, 7, 49)]
    with pytest.raises(ConfigError, match="num_train_timesteps=50, got 50"):
        s.alpha_bar(50)


def test_from_betas_and_bad_input():
    betas = torch.tensor([0.1, 0.2, 0.3])
    s = NoiseSchedule.from_betas(betas)
    assert s.name == "custom" and s.num_train_timesteps == 3
    assert s.alphas_cumprod[-1].item() == pytest.approx(0.9 * 0.8 * 0.7)
    NoiseSchedule.from_betas([0.5, 1.0])  # beta = 1 (zero terminal SNR) is allowed
    with pytest.raises(ConfigError, match=r"every beta in \(0, 1\]"):
        NoiseSchedule.from_betas([0.1, 1.5])
    with pytest.raises(ConfigError, match="non-empty 1-D"):
        NoiseSchedule.from_betas([])
    with pytest.raises(ConfigError, match="unknown beta schedule 'sigmoidal'; known: cosine, linear"):
        NoiseSchedule.from_name("sigmoidal")
    with pytest.raises(ConfigError, match="num_train_timesteps"):
        NoiseSchedule.from_name("linear", 0)


@pytest.mark.parametrize("shape", [(8, 2), (4, 3, 5, 5)])
@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_conversions_round_trip(shape, prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g, dtype=torch.float64)
    sched = NoiseSchedule.from_name("linear", 1000)
    for a in (sched.alpha_bar(10), sched.alpha_bar(900), sched.alphas_cumprod[torch.randint(0, 1000, (shape[0],))]):
        a_b = a if isinstance(a, float) else a.reshape(-1, *[1] * (len(shape) - 1))
        x_t = a_b**0.5 * x0 + (1 - a_b) ** 0.5 * eps
        out = model_target(x0, eps, a, prediction_type)
        x0_hat, eps_hat = predict_x0_eps(out, x_t, a, prediction_type)
        torch.testing.assert_close(x0_hat, x0, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(eps_hat, eps, atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(x0_from_eps(x_t, eps, a), x0)
        torch.testing.assert_close(eps_from_x0(x_t, x0, a), eps)


def test_v_is_salimans_ho_definition_and_score_is_gaussian():
    a = 0.3
    x0, eps = torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5, 0.25]])
    assert torch.allclose(v_from_x0_eps(x0, eps, a), a**0.5 * eps - (1 - a) ** 0.5 * x0)
    # x0 = 0 makes q(x_t) = N(0, (1 - a) I), whose score is -x_t / (1 - a)
    x_t = (1 - a) ** 0.5 * eps
    assert torch.allclose(score_from_eps(eps, a), -x_t / (1 - a))
    with pytest.raises(ConfigError, match="unknown prediction_type 'x0'"):
        predict_x0_eps(x0, x0, a, "x0")
