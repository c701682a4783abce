"""DDPM: forward sampling, the simple loss, the posterior (eq. 6-7) and the ancestral step."""

from __future__ import annotations

import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.diffusion import (
    PREDICTION_TYPES,
    NoiseSchedule,
    ddpm_loss,
    ddpm_step,
    model_target,
    posterior_mean_variance,
    q_sample,
    sample_ddpm,
)


@pytest.fixture
def sched() -> NoiseSchedule:
    return NoiseSchedule.from_name("linear", 1000)


def test_q_sample_formula_and_moments(sched):
    x0 = torch.tensor([[2.0, -1.0]], dtype=torch.float64)
    t = 300
    a = sched.alpha_bar(t)
    noise = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x_t = q_sample(x0.expand(200_000, 2), t, sched, noise)
    assert torch.allclose(x_t, a**0.5 * x0 + (1 - a) ** 0.5 * noise)
    se = (1 - a) ** 0.5 / 200_000**0.5
    assert (x_t.mean(0) - a**0.5 * x0[0]).abs().max().item() < 5 * se
    assert (x_t.var(0) - (1 - a)).abs().max().item() < 5 * (1 - a) * (2 / 200_000) ** 0.5


def test_q_sample_per_sample_timesteps_on_images(sched):
    x0 = torch.randn(3, 1, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 500, 999])
    out = q_sample(x0, t, sched, noise)
    for i in range(3):
        torch.testing.assert_close(out[i : i + 1], q_sample(x0[i : i + 1], int(t[i]), sched, noise[i : i + 1]))
    with pytest.raises(ShapeError, match="noise shape"):
        q_sample(x0, t, sched, noise[:2])


def _oracle(x0_value: torch.Tensor, sched: NoiseSchedule, prediction_type: str):
    """The perfect network for data that is always ``x0_value``."""

    def model(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.int64 and t.shape == (x_t.shape[0],)
        a = sched.alpha_bar(t, x_t)
        x0 = x0_value.expand_as(x_t)
        eps = (x_t - a**0.5 * x0) / (1 - a) ** 0.5
        return model_target(x0, eps, a, prediction_type)

    return model


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_simple_loss_is_zero_for_the_oracle_and_one_for_a_zero_eps_model(sched, prediction_type):
    x0 = torch.full((64, 2), 0.7, dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    loss = ddpm_loss(_oracle(x0[:1], sched, prediction_type), x0, sched, g, prediction_type)
    assert loss.ndim == 0 and loss.item() < 1e-10
    if prediction_type == "epsilon":
        zero = ddpm_loss(lambda x, t: torch.zeros_like(x), torch.randn(4096, 2), sched, g)
        assert zero.item() == pytest.approx(1.0, abs=0.05)


def test_simple_loss_is_reproducible_and_differentiable(sched):
    net = torch.nn.Linear(2, 2)
    x0 = torch.randn(16, 2)
    l1 = ddpm_loss(lambda x, t: net(x), x0, sched, torch.Generator().manual_seed(3))
    l2 = ddpm_loss(lambda x, t: net(x), x0, sched, torch.Generator().manual_seed(3))
    assert l1.item() == l2.item()
    l1.backward()
    assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0
    with pytest.raises(ShapeError, match="model output shape"):
        ddpm_loss(lambda x, t: x[:, :1], x0, sched)


@pytest.mark.parametrize("t, t_prev", [(1, 0), (500, 499), (999, 998), (700, 650)])
def test_posterior_matches_bayes_rule(sched, t, t_prev):
    """q(x_t' | x_t, x0) ~ q(x_t | x_t') q(x_t' | x0): precisions add, means add precision-weighted."""
    a, a_p = sched.alpha_bar(t), sched.alpha_bar(t_prev)
    alpha = a / a_p  # q(x_t | x_t') = N(sqrt(alpha) x_t', (1 - alpha) I)
    precision = alpha / (1 - alpha) + 1 / (1 - a_p)
    x0, x_t = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    mean_ref = (alpha**0.5 / (1 - alpha) * x_t + a_p**0.5 / (1 - a_p) * x0) / precision
    mean, var = posterior_mean_variance(x0, x_t, t, sched, t_prev)
    torch.testing.assert_close(mean, mean_ref)
    assert var == pytest.approx(1 / precision, rel=1e-9)
    if t_prev == t - 1:
        assert var == pytest.approx(sched.posterior_variance[t].item(), rel=1e-9)


def test_ddpm_step_mean_variance_and_last_step(sched):
    g = torch.Generator().manual_seed(0)
    x_t, eps, z = (torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(3))
    t = 400
    x0 = (x_t - (1 - sched.alpha_bar(t)) ** 0.5 * eps) / sched.alpha_bar(t) ** 0.5
    mean, var = posterior_mean_variance(x0, x_t, t, sched)
    torch.testing.assert_close(ddpm_step(eps, t, x_t, sched, noise=torch.zeros_like(z)), mean)
    small = ddpm_step(eps, t, x_t, sched, "fixed_small", noise=z)
    large = ddpm_step(eps, t, x_t, sched, "fixed_large", noise=z)
    torch.testing.assert_close((small - mean) / z, torch.full_like(z, var**0.5))
    torch.testing.assert_close((large - mean) / z, torch.full_like(z, sched.betas[t].item() ** 0.5))
    # t = 0: no noise, the step returns the predicted x0
    x0_at_0 = (x_t - (1 - sched.alpha_bar(0)) ** 0.5 * eps) / sched.alpha_bar(0) ** 0.5
    torch.testing.assert_close(ddpm_step(eps, 0, x_t, sched, "fixed_large", noise=z), x0_at_0)
    with pytest.raises(ConfigError, match="unknown variance_type 'learned'"):
        ddpm_step(eps, t, x_t, sched, "learned")


def test_ddpm_step_with_per_sample_timesteps_equals_one_call_per_sample(sched):
    g = torch.Generator().manual_seed(0)
    x_t, out, z = (torch.randn(3, 1, 2, 2, generator=g) for _ in range(3))
    t = torch.tensor([0, 10, 999])
    for variance_type in ("fixed_small", "fixed_large"):
        batched = ddpm_step(out, t, x_t, sched, variance_type, "v_prediction", z)
        for i in range(3):
            one = ddpm_step(
                out[i : i + 1], int(t[i]), x_t[i : i + 1], sched, variance_type, "v_prediction", z[i : i + 1]
            )
            torch.testing.assert_close(batched[i : i + 1], one)


def test_clip_sample_bounds_the_predicted_x0(sched):
    x_t = torch.full((2, 2), 3.0)
    out = torch.zeros(2, 2)
    # t = 0 returns x0_hat itself, here 3 / sqrt(a_0) without clipping
    assert ddpm_step(out, 0, x_t, sched).min().item() > 2.9
    assert ddpm_step(out, 0, x_t, sched, clip_sample=True).abs().max().item() == pytest.approx(1.0)


def test_sample_ddpm_visits_every_timestep_in_order_without_autograd():
    sched = NoiseSchedule.from_name("linear", 20)
    seen: list[torch.Tensor] = []

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        seen.append(t.clone())
        return 0.1 * x

    x_T = torch.randn(5, 1, 3, 3)
    out = sample_ddpm(model, x_T, sched, generator=torch.Generator().manual_seed(0))
    assert out.shape == x_T.shape and torch.isfinite(out).all()
    assert [int(t[0]) for t in seen] == list(range(19, -1, -1))
    assert all(t.dtype == torch.int64 and t.shape == (5,) for t in seen)
    again = sample_ddpm(model, x_T, sched, generator=torch.Generator().manual_seed(0))
    other = sample_ddpm(model, x_T, sched, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again) and not torch.allclose(out, other)
    with pytest.raises(ConfigError, match="unknown prediction_type"):
        sample_ddpm(model, x_T, sched, prediction_type="noise")


@pytest.mark.parametrize(
    "t",
    [
        torch.tensor([0, 1000]),  # t = T
        torch.tensor([5, 1 << 40]),
        torch.tensor([-1, 3]),  # q_sample has no step "before 0"
        torch.tensor([0.0, 999.0]),  # float where int is expected
        torch.tensor([0.5, 2.5]),
        torch.tensor([True, False]),
    ],
)
def test_out_of_range_or_float_tensor_timesteps_are_one_line_errors(sched, t):
    x0 = torch.randn(2, 3)
    with pytest.raises(ShapeError, match=r"q_sample: t: expected .*timesteps in \[0, 1000\)") as e:
        q_sample(x0, t, sched)
    assert "\n" not in str(e.value)
    with pytest.raises(ShapeError, match=r"ddpm_step: t: expected"):
        ddpm_step(torch.zeros_like(x0), t, x0, sched)
    with pytest.raises(ShapeError, match=r"posterior_mean_variance: t: expected"):
        posterior_mean_variance(x0, x0, t, sched)


def test_schedule_lookup_rejects_t_at_or_above_T_and_floats(sched):
    with pytest.raises(ShapeError, match=r"t: expected timesteps below 1000, num_train_timesteps=1000, got 0\.\.1000"):
        sched.alpha_bar(torch.tensor([0, 1000]))
    with pytest.raises(ShapeError, match="integer tensor of timesteps below 1000, got dtype torch.float32"):
        sched.alpha_bar(torch.tensor([3.0]))
    with pytest.raises(ConfigError, match="expected an integer timestep below 1000, got 2.5"):
        sched.alpha_bar(2.5)
    with pytest.raises(ShapeError, match="dtype torch.float32"):
        sched.alpha_bar(torch.tensor(2.5))  # a 0-d float tensor is not truncated to 2
    with pytest.raises(ConfigError, match=r"q_sample: t: expected an integer timestep in \[0, 1000\), .*got -1"):
        q_sample(torch.zeros(1, 2), -1, sched)
    assert sched.alpha_bar(torch.tensor([-1, 999])).tolist() == [1.0, sched.alpha_bar(999)]  # t < 0: alpha_bar = 1
    assert sched.alpha_bar(torch.tensor(7)) == sched.alpha_bar(7)


def test_schedule_stays_real_when_built_under_the_meta_device():
    # parameter counting builds models under torch.device("meta"); the schedule must not follow
    with torch.device("meta"):
        s = NoiseSchedule.from_name("linear", 50)
        c = NoiseSchedule.from_betas([0.1, 0.2])
    assert s.alphas_cumprod.device.type == "cpu" and s.alpha_bar(3) == NoiseSchedule.from_name("linear", 50).alpha_bar(
        3
    )
    assert c.alphas_cumprod.tolist() == pytest.approx([0.9, 0.72])
