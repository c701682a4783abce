"""Scores from noise-predicting networks, and the continuous-time denoising score matching loss.

A network eps(x_t, label) trained to predict the noise z of x_t = m(t) x0 + s(t) z gives the score
    s_theta(x, t) = -eps(x, label(t)) / s(t)                    (Song et al. 2021, sec. 3.3 / app. C)
with label(t) = t (N - 1): on the N-step grid, the same time input a DDPM network sees as its integer
timestep, so a model trained by ``notelab diffusion train`` is usable as a VP score (one model, many
samplers). Other parametrisations (x0, v) go through eps first (``predict_x0_eps`` with abar = m^2).

Denoising score matching in continuous time (eq. 7), t ~ U(eps, T), z ~ N(0, I):
    L = E_t lambda(t) E || s_theta(m x0 + s z, t) + z / s ||^2
      = E_t (lambda(t) / s^2) E || eps(x_t, t) - z ||^2
  weighting "eps":        lambda = s^2 (the DDPM-like simple loss; the reference's default)
  weighting "likelihood": lambda = g(t)^2, for which L (summed over dims) bounds -log p_0 up to a
                          constant (Song, Durkan, Murray & Ermon 2021, "Maximum Likelihood Training of
                          Score-Based Diffusion Models", thm. 1); with ``importance`` t is drawn from
                          p(t) proportional to g^2 / s^2 (tabulated inverse CDF) and weighted 1 / p(t),
                          which removes most of that weighting's variance (their sec. 5).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.core.tensor import append_dims
from notelab.diffusion.parametrization import check_prediction_type, predict_x0_eps
from notelab.diffusion.sde import SDE, VPSDE, SubVPSDE, _time

WEIGHTINGS = ("eps", "likelihood")
Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def time_label(sde: SDE, t: torch.Tensor) -> torch.Tensor:
    """The network's time input for continuous t: t (N - 1), DDPM's integer timestep scale."""
    return t * (sde.N - 1) / sde.T


def eps_to_score(
    net: Net, sde: SDE, prediction_type: str = "epsilon"
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """score(x, t) = -eps(x, t (N - 1)) / s(t), from a network predicting eps (or x0 / v for VP SDEs)."""
    check_prediction_type(prediction_type)
    if prediction_type != "epsilon" and (not isinstance(sde, VPSDE) or isinstance(sde, SubVPSDE)):
        # x0 / v are defined with m^2 + s^2 = 1
        raise ConfigError(
            f"prediction_type: {prediction_type!r} converts to a score only under the VP SDE, got {type(sde).__name__}"
        )

    def score(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        t = _time(t, x)
        m, s = sde.marginal_coefs(t)
        out = net(x, time_label(sde, t))
        if prediction_type != "epsilon":
            _, out = predict_x0_eps(out, x, append_dims(m**2, x.ndim), prediction_type)
        return -out / append_dims(s, x.ndim)

    return score


def importance_table(sde: SDE, eps: float, n: int = 4096) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grid, CDF, density) of p(t) proportional to g(t)^2 / s(t)^2 on [eps, T], trapezoid rule, float64."""
    t = torch.linspace(eps, sde.T, n, dtype=torch.float64)
    _, s = sde.marginal_coefs(t)
    w = sde.g(t) ** 2 / s**2
    cdf = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum((w[1:] + w[:-1]) / 2 * (t[1:] - t[:-1]), 0)])
    z = cdf[-1]
    return t, cdf / z, w / z


def sample_importance_t(
    sde: SDE, n: int, eps: float, generator: torch.Generator | None, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, p(t)) with t ~ p(t) proportional to g^2 / s^2 by the inverse CDF (linear within grid cells)."""
    grid, cdf, dens = importance_table(sde, eps)
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float64).cpu()
    i = torch.searchsorted(cdf, u).clamp(1, len(grid) - 1)
    frac = (u - cdf[i - 1]) / (cdf[i] - cdf[i - 1])
    t = grid[i - 1] + frac * (grid[i] - grid[i - 1])
    p = dens[i - 1] + frac * (dens[i] - dens[i - 1])
    return t.to(device), p.to(device)


def dsm_loss(
    net: Net,
    x0: torch.Tensor,
    sde: SDE,
    generator: torch.Generator | None = None,
    weighting: str = "eps",
    importance: bool = False,
    eps: float = 1e-5,
) -> torch.Tensor:
    """Continuous-time denoising score matching (module docstring), mean over samples and dimensions."""
    if weighting not in WEIGHTINGS:
        raise unknown_name("weighting", weighting, WEIGHTINGS)
    if importance and weighting != "likelihood":
        raise ConfigError("importance: sampling t by g^2 / s^2 is for weighting='likelihood', got weighting='eps'")
    if not 0 < eps < sde.T:
        raise ConfigError(f"eps: expected 0 < eps < T={sde.T}, got {eps}")
    b = x0.shape[0]
    if importance:
        t64, p = sample_importance_t(sde, b, eps, generator, x0.device)
        t = t64.to(torch.float32)
    else:
        t = torch.rand(b, generator=generator, device=x0.device) * (sde.T - eps) + eps
    z = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    m, s = sde.marginal_coefs(t)
    x_t = append_dims(m.to(x0.dtype), x0.ndim) * x0 + append_dims(s.to(x0.dtype), x0.ndim) * z
    out = net(x_t, time_label(sde, t))
    if out.shape != x0.shape:
        raise ShapeError(f"dsm_loss: network output shape {tuple(out.shape)} must equal x0 shape {tuple(x0.shape)}")
    per = (out.float() - z.float()).pow(2).flatten(1).mean(1)  # || eps - z ||^2 per dim, fp32 under autocast
    if weighting == "eps":
        return per.mean()
    w = sde.g(t).float() ** 2 / s.float() ** 2  # lambda / s^2 with lambda = g^2
    if importance:
        w = w / p.float() / (sde.T - eps)  # the uniform density 1 / (T - eps) the plain estimator assumes
    return (w * per).mean()
