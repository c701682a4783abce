"""Samplers for score SDEs (Song et al. 2021, sec. 4 and appendix G), all on ``notelab.core.integrate``.

From x_T ~ prior down to t = eps over the grid t_k = linspace(T, eps, steps + 1), h = t_{k+1} - t_k < 0:
  Euler-Maruyama ("em"):    x' = x + [f - g^2 s](x, t) h + g sqrt(-h) z                        (eq. 6)
  reverse diffusion ("rd"):  x' = x - (f_i - G_i^2 s(x, t)) + G_i z, the reverse of the SDE's own
                             discretisation (eq. 46-47) with N = steps
  Langevin corrector:        x <- x + e s(x, t) + sqrt(2 e) z,  e = 2 alpha (snr |z| / |s|)^2  (Algorithm 5)
  predictor-corrector ("pc"): ``n_corrector`` Langevin steps, then one reverse-diffusion step  (Algorithm 1)
  probability-flow ODE ("ode"): dx/dt = f - g^2 s / 2 (eq. 13), adaptive (dopri5) or fixed-step
The last stochastic step returns its mean (no noise) when ``denoise``; the ODE sampler denoises by
Tweedie's formula x0 = (x + s(t)^2 score) / m(t) at t = eps (one more evaluation). The NFE is
the number of score evaluations.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.core.integrate import NFECounter, counted, euler, heun, integrate, odeint, rk4
from notelab.core.tensor import append_dims
from notelab.diffusion.sde import SDE, Score, _time

SDE_SAMPLERS = ("pc", "em", "rd", "ode")
ODE_METHODS = ("dopri5", "euler", "heun", "rk4")
FIXED = {"euler": euler, "heun": heun, "rk4": rk4}


@dataclass
class SampleResult:
    x: torch.Tensor
    nfe: int


def checked_score(score_fn: Score, sde: SDE, eps: float) -> NFECounter:
    """``score_fn`` counted, and checked on every call: output shaped like x and finite."""
    if not callable(score_fn):
        raise ConfigError(f"score_fn: expected a callable score_fn(x, t), got {type(score_fn).__name__}")

    def score(x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        tt = _time(t, x)
        out = score_fn(x, tt)
        if not isinstance(out, torch.Tensor) or out.shape != x.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ShapeError(f"score_fn: expected an output of shape {tuple(x.shape)} (x's), got {got}")
        if not bool(torch.isfinite(out).all()):
            raise ShapeError(f"score_fn: returned non-finite values (NaN or inf) at t={float(tt.max()):.4g}")
        return out

    return NFECounter(score)


def check_eps(eps: float, sde: SDE) -> float:
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real) or not 0 < eps < sde.T:
        raise ConfigError(f"eps: expected 0 < eps < T={sde.T}, got {eps!r}")
    return float(eps)


def check_steps(steps: int) -> int:
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 1:
        raise ConfigError(f"steps: expected an int >= 1, got {steps!r}")
    return int(steps)


def _noise(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def em_step(
    sde: SDE, score: Score, x: torch.Tensor, t: float, t_next: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', mean) of one Euler-Maruyama step of the reverse SDE from t to t_next < t."""
    h = t_next - t
    drift, g = sde.reverse(score).sde(x, t)
    mean = x + drift * h
    return mean + append_dims(g, x.ndim) * math.sqrt(-h) * noise, mean


def reverse_diffusion_step(
    sde: SDE, score: Score, x: torch.Tensor, t: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', mean) of the reverse-diffusion predictor at t, on ``sde``'s N-step discretisation."""
    f, G = sde.reverse(score).discretize(x, t)
    mean = x - f
    return mean + append_dims(G, x.ndim) * noise, mean


def langevin_step(
    sde: SDE, score: Score, x: torch.Tensor, t: float, snr: float, noise: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x', mean) of one Langevin corrector step (Algorithm 5): norms are batch means of per-sample norms."""
    tt = _time(t, x)
    grad = score(x, tt)
    grad_norm = grad.flatten(1).norm(dim=1).mean()
    noise_norm = noise.flatten(1).norm(dim=1).mean()
    step = append_dims((snr * noise_norm / grad_norm) ** 2 * 2 * sde.langevin_alpha(tt), x.ndim)
    mean = x + step * grad
    return mean + (2 * step).sqrt() * noise, mean


def tweedie_denoise(sde: SDE, score: Score, x: torch.Tensor, t: float) -> torch.Tensor:
    """E[x0 | x_t] = (x_t + s(t)^2 score(x_t, t)) / m(t) (Tweedie's formula)."""
    tt = _time(t, x)
    m, s = sde.marginal_coefs(tt)
    return (x + append_dims(s**2, x.ndim) * score(x, tt)) / append_dims(m, x.ndim)


def sample_sde(
    score_fn: Score,
    sde: SDE,
    shape: tuple[int, ...],
    sampler: str = "pc",
    steps: int = 1000,
    generator: torch.Generator | None = None,
    *,
    snr: float = 0.16,
    n_corrector: int = 1,
    eps: float = 1e-3,
    denoise: bool = True,
    x_T: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    progress: bool = False,
) -> SampleResult:
    """Samples of ``shape`` by ``sampler`` (module docstring) in ``steps`` steps; returns (x, nfe).

    ``sampler="ode"`` is :func:`sample_ode` with ``method`` (dopri5 uses rtol / atol; euler / heun
    / rk4 take ``steps`` steps). ``x_T`` (else drawn from the prior with ``generator``) fixes the start.
    """
    if sampler not in SDE_SAMPLERS:
        raise unknown_name("sampler", sampler, SDE_SAMPLERS)
    eps, steps = check_eps(eps, sde), check_steps(steps)
    if isinstance(snr, bool) or not isinstance(snr, numbers.Real) or not snr > 0:
        raise ConfigError(f"snr: expected a number > 0, got {snr!r}")
    if isinstance(n_corrector, bool) or not isinstance(n_corrector, numbers.Integral) or n_corrector < 0:
        raise ConfigError(f"n_corrector: expected an int >= 0, got {n_corrector!r}")
    if x_T is None:
        gen_device = generator.device if generator is not None else device
        x_T = sde.prior_sampling(tuple(shape), generator, device=gen_device, dtype=dtype).to(device)
    elif tuple(x_T.shape) != tuple(shape):
        raise ShapeError(f"x_T: expected shape {tuple(shape)}, got {tuple(x_T.shape)}")
    if len(shape) < 2:
        raise ShapeError(f"shape: expected (B, ...), got {tuple(shape)}")
    if sampler == "ode":
        return sample_ode(score_fn, sde, x_T, method, rtol, atol, eps=eps, steps=steps, denoise=denoise)
    score = checked_score(score_fn, sde, eps)
    times = torch.linspace(sde.T, eps, steps + 1, dtype=torch.float64).tolist()
    last = times[-1]
    disc = sde.with_steps(steps)  # the reverse-diffusion predictor's chain is the sampling grid
    if sampler != "em":
        disc.check_discretization()

    def step(x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
        if sampler == "pc":
            for _ in range(n_corrector):
                x, _ = langevin_step(disc, score, x, t, snr, _noise(x, generator))
        if sampler == "em":
            x, mean = em_step(sde, score, x, t, t_next, _noise(x, generator))
        else:
            x, mean = reverse_diffusion_step(disc, score, x, t, _noise(x, generator))
        return mean if (denoise and t_next == last) else x

    with torch.no_grad():
        x = integrate(x_T, times, step, progress, desc=f"{sampler} {steps}")
    return SampleResult(x, score.nfe)


def pf_field(sde: SDE, score: Score, eps: float) -> Callable[[torch.Tensor, float], torch.Tensor]:
    """The probability-flow ODE's vector field f(x, t) - g(t)^2 score(x, t) / 2 (eq. 13) on [eps, T].

    t is clamped into [eps, T]: dopri5's initial step-size probe evaluates one step past the
    interval's end, where s(t) may not exist (VP at t < 0); the probe only sizes the first step.
    """
    rev = sde.probability_flow(score)
    return lambda x, t: rev.sde(x, min(max(t, eps), sde.T))[0]


def sample_ode(
    score_fn: Score,
    sde: SDE,
    x_T: torch.Tensor,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    *,
    eps: float = 1e-3,
    steps: int = 100,
    denoise: bool = False,
    progress: bool = False,
) -> SampleResult:
    """Integrate the probability-flow ODE from x_T at t = T down to t = eps; returns (x, nfe).

    ``method``: "dopri5" (adaptive, ``rtol`` / ``atol``) or fixed-step "euler" / "heun" / "rk4"
    over ``steps`` uniform steps. Deterministic: the same x_T gives the same sample.
    """
    if method not in ODE_METHODS:
        raise unknown_name("ODE method", method, ODE_METHODS)
    eps = check_eps(eps, sde)
    if x_T.ndim < 2:
        raise ShapeError(f"x_T: expected (B, ...), got {tuple(x_T.shape)}")
    score = checked_score(score_fn, sde, eps)
    field = pf_field(sde, score, eps)
    with torch.no_grad():
        if method == "dopri5":
            x = odeint(counted(field), x_T, [sde.T, eps], method, rtol, atol)
        else:
            times = torch.linspace(sde.T, eps, check_steps(steps) + 1, dtype=torch.float64).tolist()
            x = integrate(x_T, times, FIXED[method](field), progress, desc=f"ODE {method}")
        if denoise:
            x = tweedie_denoise(sde, score, x, eps)
    return SampleResult(x, score.nfe)
