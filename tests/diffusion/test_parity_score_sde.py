"""Score SDEs against their peers on identical inputs: diffusers' ScoreSdeVeScheduler (reverse-diffusion
predictor, Langevin corrector) and ScoreSdeVpScheduler (Euler-Maruyama), torchdiffeq on the
probability-flow ODE, and DDPM's discrete chain as the VP SDE's discretisation."""

from __future__ import annotations

import pytest
import torch
import torchdiffeq
from diffusers import ScoreSdeVeScheduler
from diffusers.schedulers import ScoreSdeVpScheduler

from notelab.diffusion import NoiseSchedule, q_sample
from notelab.diffusion.samplers import em_step, langevin_step, pf_field, reverse_diffusion_step, sample_ode
from notelab.diffusion.score import dsm_loss, eps_to_score
from notelab.diffusion.sde import VESDE, VPSDE, SubVPSDE


def _score_net(d: int):
    g = torch.Generator().manual_seed(0)
    W = torch.randn(d, d, generator=g) / d**0.5

    def score(x, t):
        return torch.tanh(x @ W.to(x.dtype)) - x * (1 + t[:, None])

    return score


@pytest.mark.parametrize("t_index", [0, 3, 9])
def test_ve_predictor_and_corrector_equal_diffusers(t_index):
    steps = 10
    ref = ScoreSdeVeScheduler(sigma_min=0.01, sigma_max=50.0, snr=0.16)
    ref.set_timesteps(steps)
    ref.set_sigmas(steps)
    sde = VESDE(N=steps, sigma_min=0.01, sigma_max=50.0)
    score = _score_net(4)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(1)) * 3
    t = float(ref.timesteps[t_index])
    s = score(x, torch.full((5,), t))

    want, want_mean = ref.step_pred(s, t, x, generator=torch.Generator().manual_seed(7), return_dict=False)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(7))
    got, got_mean = reverse_diffusion_step(sde, score, x, t, noise)
    torch.testing.assert_close(got_mean, want_mean)
    torch.testing.assert_close(got, want)

    (want,) = ref.step_correct(s, x, generator=torch.Generator().manual_seed(8), return_dict=False)
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(8))
    got, _ = langevin_step(sde, score, x, t, 0.16, noise)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("t", [1.0, 0.5, 0.01])
def test_vp_euler_maruyama_equals_diffusers(t):
    steps = 50
    ref = ScoreSdeVpScheduler(beta_min=0.1, beta_max=20.0)
    ref.set_timesteps(steps)
    sde = VPSDE(beta_min=0.1, beta_max=20.0)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 3, generator=g)
    eps_out = torch.randn(5, 3, generator=g)  # the network's noise prediction
    tt = torch.full((5,), t)
    want, want_mean = ref.step_pred(eps_out, x, tt, generator=torch.Generator().manual_seed(9))
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    score = eps_to_score(lambda y, label: eps_out, sde)
    got, got_mean = em_step(sde, score, x, t, t - 1 / steps, noise)
    torch.testing.assert_close(got_mean, want_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sde", [VESDE(sigma_max=20.0), VPSDE(), SubVPSDE()], ids=["ve", "vp", "subvp"])
def test_probability_flow_ode_equals_torchdiffeq(sde):
    net = _score_net(3)

    def score(x, t):  # scaled like a true score, ~ -x / (1 + s(t)^2), so that the ODE is not stiff
        return net(x, t * 0) / (1 + sde.marginal_coefs(t)[1] ** 2)[:, None]

    x_T = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    ours = sample_ode(lambda x, t: score(x, t.to(x.dtype)), sde, x_T, rtol=1e-7, atol=1e-7, eps=1e-3)
    field = pf_field(sde, lambda x, t: score(x, t.to(x.dtype)), 1e-3)
    ref = torchdiffeq.odeint(
        lambda t, y: field(y, float(t)), x_T, torch.tensor([1.0, 1e-3], dtype=torch.float64), rtol=1e-7, atol=1e-7
    )[-1]
    torch.testing.assert_close(ours.x, ref, rtol=1e-10, atol=1e-10)
    for method, steps in [("rk4", 200), ("heun", 400)]:
        fixed = sample_ode(lambda x, t: score(x, t.to(x.dtype)), sde, x_T, method, eps=1e-3, steps=steps)
        assert fixed.nfe == steps * (4 if method == "rk4" else 2)
        torch.testing.assert_close(fixed.x, ref, rtol=1e-4, atol=1e-4)


def test_vp_discretisation_is_ddpm():
    sched = NoiseSchedule.from_name("linear", 1000)
    sde = VPSDE.from_ddpm(1e-4, 0.02, 1000)
    t = (torch.arange(1000, dtype=torch.float64) + 0.5) / 999  # floor(t (N - 1)) = i: index i of the chain
    a, b = sde.discrete_transition(t)
    torch.testing.assert_close(b**2, sched.betas.to(torch.float64), rtol=1e-12, atol=1e-12)
    # the discrete chain's forward marginal = DDPM's q(x_t | x0): the product of its a_i^2 is alpha_bar
    abar = torch.cumprod(a**2, 0)
    torch.testing.assert_close(abar, torch.tensor([sched.alpha_bar(i) for i in range(1000)], dtype=torch.float64))
    # and the continuous VP marginal at t = (i + 1) / N agrees to O(1/N)
    m, s = sde.marginal_coefs((torch.arange(1000, dtype=torch.float64) + 1) / 1000)
    assert (m**2 - abar).abs().max().item() < 2e-3
    torch.testing.assert_close(m**2 + s**2, torch.ones_like(m))
    x0 = torch.randn(3, 2, dtype=torch.float64)
    mean, std = sde.marginal_prob(x0, 0.5)
    z = torch.randn(3, 2, dtype=torch.float64)
    i = 499  # t = (i + 1) / N
    torch.testing.assert_close(mean + std[:, None] * z, q_sample(x0, i, sched, noise=z), rtol=0, atol=5e-3)


def test_ddpm_network_as_a_vp_score():
    # an eps-network for DDPM's integer timesteps, read as a score through t (N - 1)
    sched_sde = VPSDE.from_ddpm(1e-4, 0.02, 1000)
    seen = []

    def net(x, label):
        seen.append(label)
        return x * 0.5

    score = eps_to_score(net, sched_sde)
    x = torch.randn(2, 3)
    out = score(x, torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(seen[0], torch.tensor([999.0, 499.5]))
    _, s = sched_sde.marginal_coefs(torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(out, -x * 0.5 / s[:, None])
    # x0- and v-parametrised networks go through eps; under VE they are refused
    v_score = eps_to_score(lambda x, label: torch.zeros_like(x), sched_sde, "sample")
    m, s = sched_sde.marginal_coefs(torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(v_score(x, torch.tensor([0.5, 0.5])), -x / s[:, None] ** 2, rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="VP"):
        eps_to_score(net, VESDE(), "sample")


def test_importance_sampled_likelihood_loss_is_unbiased():
    # the optimal eps-network for x0 ~ N(0, v0 I): eps* = s (x - 0) / (m^2 v0 + s^2)
    sde, v0 = VPSDE(), 0.3
    labels_to_t = 1 / (sde.N - 1)

    def net(x, label):
        m, s = sde.marginal_coefs(label.double() * labels_to_t)
        return (s / (m**2 * v0 + s**2))[:, None].float() * x

    x0 = torch.randn(20000, 2, generator=torch.Generator().manual_seed(4)) * v0**0.5
    losses = {}
    for imp in (False, True):
        vals = torch.stack(
            [
                dsm_loss(net, x0[i : i + 2000], sde, torch.Generator().manual_seed(10 + i), "likelihood", imp)
                for i in range(0, 20000, 2000)
            ]
        )
        losses[imp] = (vals.mean(), vals.std() / len(vals) ** 0.5)
    (m0, se0), (m1, se1) = losses[False], losses[True]
    assert abs(m0 - m1) < 4 * (se0**2 + se1**2) ** 0.5
    assert se1 < se0  # importance sampling cuts the variance
