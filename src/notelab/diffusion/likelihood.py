"""Exact log-likelihood of a score SDE through its probability-flow ODE (Song et al. 2021, sec. 4.3 and
appendix D.2), by the instantaneous change of variables (Chen et al. 2018, thm. 1):

    log p_0(x(0)) = log p_T(x(T)) + int_0^T div f~(x(t), t) dt,   f~ = f - g^2 s / 2   (eq. 39)

integrated from t = eps to T as one ODE in the state (x, delta) with d delta/dt = div f~. The
divergence is exact (one vector-Jacobian product per dimension) or the Hutchinson-Skilling estimate
v^T (df~/dx) v with one v drawn per sample and held over the whole solve (an unbiased estimate of
log p). ``bits_per_dim`` of ``notelab.eval`` turns nats of dequantised data into bits/dim.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from notelab.core import integrate as ig
from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.diffusion.ddpm import Model, call_model, posterior_coefficients, q_sample
from notelab.diffusion.parametrization import Coef, check_prediction_type, predict_x0_eps
from notelab.diffusion.samplers import check_eps, checked_score, pf_field
from notelab.diffusion.schedules import NoiseSchedule
from notelab.diffusion.sde import SDE, Score


@dataclass
class LikelihoodResult:
    log_p: torch.Tensor  # (B,) nats per sample
    nfe: int  # ODE right-hand-side evaluations (each one score call plus its divergence)
    z: torch.Tensor  # x(T), the latent


def log_likelihood(
    score_fn: Score,
    sde: SDE,
    x: torch.Tensor,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    divergence: str = "exact",
    *,
    eps: float = 1e-5,
    probes: int = 1,
    distribution: str = "rademacher",
    generator: torch.Generator | None = None,
) -> LikelihoodResult:
    """log p_0(x) in nats per sample by the probability-flow ODE (module docstring).

    Run it in float64 (``x.double()``) when 1e-3-nat accuracy matters; ``divergence`` is
    "exact" or "hutchinson" (``probes`` draws of ``distribution`` averaged, fixed over the solve).
    """
    if divergence not in ig.DIVERGENCE_METHODS:
        raise unknown_name("divergence", divergence, ig.DIVERGENCE_METHODS)
    eps = check_eps(eps, sde)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 1:
        raise ConfigError(f"probes: expected an int >= 1, got {probes!r}")
    if x.ndim < 2:
        raise ShapeError(f"log_likelihood: expected x of shape (B, ...), got {tuple(x.shape)}")
    score = checked_score(score_fn, sde, eps)
    field = pf_field(sde, score, eps)
    noise = ig.probe_noise(x, probes, distribution, generator) if divergence == "hutchinson" else None

    def rhs(state: tuple[torch.Tensor, torch.Tensor], t: float) -> tuple[torch.Tensor, torch.Tensor]:
        y, _ = state
        dy, div = ig.divergence(lambda v: field(v, t), y, divergence, noise=noise)
        return dy, div

    f = ig.counted(rhs)
    with torch.no_grad():
        delta0 = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        z, delta = ig.odeint(f, (x, delta0), [eps, sde.T], method, rtol, atol)
    return LikelihoodResult(sde.prior_logp(z) + delta, f.nfe, z)


def gaussian_kl(mean1: torch.Tensor, var1: Coef, mean2: torch.Tensor, var2: Coef) -> torch.Tensor:
    """KL(N(mean1, var1 I) || N(mean2, var2 I)) per sample, summed over the non-batch dims."""
    var1 = torch.as_tensor(var1, dtype=mean1.dtype, device=mean1.device)
    var2 = torch.as_tensor(var2, dtype=mean1.dtype, device=mean1.device)
    per = 0.5 * (torch.log(var2 / var1) + (var1 + (mean1 - mean2) ** 2) / var2 - 1)
    return per.flatten(1).sum(1)


def ddpm_nll_bound(
    eps_model: Model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    prediction_type: str = "epsilon",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """A one-sample estimate of DDPM's variational bound on -log p(x0), nats per sample (Ho et al.
    2020, eq. 5), for continuous data, with the reverse variances sigma_t^2 = beta_t:

        L = KL(q(x_T | x0) || N(0, I)) + sum_{t>1} KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t))
            - log N(x0; mu_theta(x_1, 1), beta_1 I),

    every term at one draw x_t ~ q(x_t | x0) (so E[L] is the bound). Costs T network calls.
    sigma_t^2 = beta_t ("fixed_large") because the decoder needs a variance > 0 at t = 1, where
    beta_tilde is 0.
    """
    check_prediction_type(prediction_type)
    T = schedule.num_train_timesteps
    a_T = schedule.alpha_bar(T - 1)
    total = gaussian_kl(a_T**0.5 * x0, 1 - a_T, torch.zeros_like(x0), 1.0)
    with torch.no_grad():
        for t in range(T):
            a = schedule.alpha_bar(t)
            x_t = q_sample(x0, t, schedule, generator=generator)
            x0_hat, _ = predict_x0_eps(call_model(eps_model, x_t, t), x_t, a, prediction_type)
            a_prev = schedule.alpha_bar(t - 1) if t > 0 else 1.0
            c0, ct, beta_tilde = posterior_coefficients(a, a_prev)
            beta = 1 - a / a_prev
            if t == 0:  # the decoder: mu_theta(x_1, 1) = x0_hat (c0 = 1, ct = 0)
                total = total + _neg_log_normal(x0, x0_hat, beta)
            else:
                total = total + gaussian_kl(c0 * x0 + ct * x_t, beta_tilde, c0 * x0_hat + ct * x_t, beta)
    return total


def _neg_log_normal(x: torch.Tensor, mean: torch.Tensor, var: float) -> torch.Tensor:
    per = 0.5 * (math.log(2 * math.pi * var) + (x - mean) ** 2 / var)
    return per.flatten(1).sum(1)


def dequantize(x: torch.Tensor, bin_width: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """x + w (u - 1/2), u ~ U[0, 1)^D: uniform dequantisation of data on a grid of spacing w (Theis et
    al. 2016), so that a density's log p of the result, plus D log w, lower-bounds the discrete data's
    log-probability in expectation (``notelab.eval.bits_per_dim`` applies that term)."""
    if not bin_width > 0:
        raise ConfigError(f"dequantize: expected bin_width > 0, got {bin_width!r}")
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return x + bin_width * (u - 0.5)
