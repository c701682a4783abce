"""DDPM: the simple training loss and ancestral sampling (Ho et al. 2020, "Denoising Diffusion
Probabilistic Models"), with a = alpha_bar_t, a' = alpha_bar_{t'} for the previous step t' < t.

Forward sample (eq. 4):      x_t = sqrt(a) x0 + sqrt(1 - a) eps,   eps ~ N(0, I)
Simple loss (eq. 14):        L = E_{t ~ U{0..T-1}, x0, eps} || target - model(x_t, t) ||^2,
                             target = eps (or x0 / v, see ``parametrization``)
Posterior (eq. 6-7), with beta = 1 - a / a' (= beta_t when t' = t - 1):
    q(x_t' | x_t, x0) = N(mu_tilde, beta_tilde I)
    mu_tilde   = sqrt(a') beta / (1 - a) x0 + sqrt(1 - beta) (1 - a') / (1 - a) x_t
    beta_tilde = (1 - a') / (1 - a) beta
Ancestral step (Algorithm 2): x_t' = mu_tilde(x_t, x0_hat) + sigma z, with
    ``fixed_small``: sigma^2 = beta_tilde (clamped at 1e-20, as diffusers; the log-variance is finite)
    ``fixed_large``: sigma^2 = beta       (the upper bound of sec. 3.2)
and no noise on the last step (t' < 0, where a' = 1 and the posterior collapses onto x0_hat).
Diffusers' ``DDPMScheduler.step`` is matched exactly on the full chain; for a strided chain it adds
noise whenever t > 0, we whenever t' >= 0, which differs only on a final step that starts above 0.

Every sampler in this family runs ``notelab.core.integrate.integrate``; a sampler is a step function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from notelab.core.errors import ShapeError, unknown_name
from notelab.core.integrate import integrate
from notelab.diffusion.parametrization import (
    Coef,
    as_coef,
    check_prediction_type,
    clip_or_threshold,
    model_target,
    predict_x0_eps,
)
from notelab.diffusion.schedules import NoiseSchedule, check_timesteps

VARIANCE_TYPES = ("fixed_small", "fixed_large")

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[torch.Tensor, int, int], torch.Tensor]


def q_sample(
    x0: torch.Tensor,
    t: torch.Tensor | int,
    schedule: NoiseSchedule,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw x_t ~ q(x_t | x0) (eq. 4); ``t`` is an int or a ``(B,)`` int64 tensor, in [0, T)."""
    check_timesteps(t, schedule.num_train_timesteps, name="q_sample: t")
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    elif noise.shape != x0.shape:
        raise ShapeError(f"q_sample: noise shape {tuple(noise.shape)} must equal x0 shape {tuple(x0.shape)}")
    a = schedule.alpha_bar(t, x0)
    return as_coef(a**0.5, x0) * x0 + as_coef((1 - a) ** 0.5, x0) * noise


def ddpm_loss(
    model: Model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    generator: torch.Generator | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """The simple loss of eq. 14 (mean over every element), t uniform on {0, ..., T-1}."""
    check_prediction_type(prediction_type)
    t = torch.randint(0, schedule.num_train_timesteps, (x0.shape[0],), generator=generator, device=x0.device)
    eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    a = schedule.alpha_bar_unchecked(t, x0)  # t drawn in range just above
    out = model(as_coef(a**0.5, x0) * x0 + as_coef((1 - a) ** 0.5, x0) * eps, t)
    if out.shape != x0.shape:
        raise ShapeError(f"ddpm_loss: model output shape {tuple(out.shape)} must equal x0 shape {tuple(x0.shape)}")
    # fp32 loss under bf16 autocast: the target's small values would round away
    return F.mse_loss(out.float(), model_target(x0, eps, a, prediction_type).float())


def posterior_coefficients(alpha_bar_t: Coef, alpha_bar_prev: Coef) -> tuple[Coef, Coef, Coef]:
    """(coef on x0, coef on x_t, beta_tilde) of q(x_t' | x_t, x0), eq. 6-7."""
    beta = 1 - alpha_bar_t / alpha_bar_prev
    coef_x0 = alpha_bar_prev**0.5 * beta / (1 - alpha_bar_t)
    coef_xt = (1 - beta) ** 0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    return coef_x0, coef_xt, (1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta


def posterior_mean_variance(
    x0: torch.Tensor,
    x_t: torch.Tensor,
    t: int | torch.Tensor,
    schedule: NoiseSchedule,
    t_prev: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, Coef]:
    """Mean and variance of q(x_{t_prev} | x_t, x0) (eq. 6-7); ``t_prev`` defaults to t - 1."""
    check_timesteps(t, schedule.num_train_timesteps, name="posterior_mean_variance: t")
    t_prev = t - 1 if t_prev is None else t_prev
    c0, ct, var = posterior_coefficients(schedule.alpha_bar(t, x_t), schedule.alpha_bar(t_prev, x_t))
    return as_coef(c0, x_t) * x0 + as_coef(ct, x_t) * x_t, var


def ddpm_step(
    model_output: torch.Tensor,
    t: int | torch.Tensor,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    variance_type: str = "fixed_small",
    prediction_type: str = "epsilon",
    noise: torch.Tensor | None = None,
    clip_sample: bool = False,
    *,
    t_prev: int | torch.Tensor | None = None,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One ancestral step x_t -> x_{t_prev} (Algorithm 2); ``t_prev`` defaults to t - 1.

    ``noise`` is the N(0, I) draw for the variance term (drawn from ``generator`` when None).
    """
    if variance_type not in VARIANCE_TYPES:
        raise unknown_name("variance_type", variance_type, VARIANCE_TYPES)
    check_timesteps(t, schedule.num_train_timesteps, name="ddpm_step: t")
    t_prev = t - 1 if t_prev is None else t_prev
    a_t, a_prev = schedule.alpha_bar(t, x_t), schedule.alpha_bar(t_prev, x_t)
    x0, _ = predict_x0_eps(model_output, x_t, a_t, prediction_type)
    x0 = clip_or_threshold(
        x0, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
    )
    c0, ct, beta_tilde = posterior_coefficients(a_t, a_prev)
    mean = as_coef(c0, x_t) * x0 + as_coef(ct, x_t) * x_t
    if isinstance(t_prev, torch.Tensor) and t_prev.ndim > 0:
        last = (t_prev < 0).to(x_t.dtype)
        if bool(last.all()):
            return mean
        keep = 1 - as_coef(last, x_t)
    elif int(t_prev) < 0:
        return mean
    else:
        keep = 1.0
    if variance_type == "fixed_small":
        var = beta_tilde.clamp(min=1e-20) if isinstance(beta_tilde, torch.Tensor) else max(beta_tilde, 1e-20)
    else:
        var = 1 - a_t / a_prev
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return mean + keep * as_coef(var**0.5, x_t) * noise


def call_model(model: Model, x: torch.Tensor, t: int) -> torch.Tensor:
    """``model(x, t)`` with ``t`` as the ``(B,)`` int64 tensor every network here expects."""
    return model(x, torch.full((x.shape[0],), t, dtype=torch.long, device=x.device))


def int_step(step: Step) -> Callable[[torch.Tensor, float, float], torch.Tensor]:
    """A step over integer timesteps as a step of ``notelab.core.integrate.integrate`` (float times)."""
    return lambda x, t, t_next: step(x, round(t), round(t_next))


def run_chain(x: torch.Tensor, timesteps: Sequence[int], step: Step, progress: bool, desc: str) -> torch.Tensor:
    """x = step(x, t, t_next) over consecutive integer ``timesteps``, without autograd.

    Every sampler and the DDIM inversion of this family is ``integrate`` with its own ``step``.
    """
    with torch.no_grad():
        return integrate(x, [float(t) for t in timesteps], int_step(step), progress, desc=desc)


def sample_ddpm(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    variance_type: str = "fixed_small",
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Ancestral sampling through all T steps, from x_T ~ N(0, I) to x_0 (Algorithm 2)."""
    if variance_type not in VARIANCE_TYPES:
        raise unknown_name("variance_type", variance_type, VARIANCE_TYPES)
    check_prediction_type(prediction_type)
    if x_T.ndim < 2:
        raise ShapeError(f"sample_ddpm: expected x_T of shape (B, ...), got {tuple(x_T.shape)}")

    def step(x: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        out = call_model(model, x, t)
        return ddpm_step(
            out, t, x, schedule, variance_type, prediction_type, clip_sample=clip_sample, generator=generator
        )

    return run_chain(x_T, range(schedule.num_train_timesteps - 1, -2, -1), step, progress, desc="DDPM")
