"""DDIM: the non-Markovian sampler for a DDPM-trained network (Song, Meng & Ermon 2021, "Denoising
Diffusion Implicit Models"), with a = alpha_bar_t and a' = alpha_bar_{t'} for the next (smaller)
timestep t' of a subsequence tau of {0, ..., T-1}.

Generalised step (eq. 12):
    x_t' = sqrt(a') x0_hat + sqrt(1 - a' - sigma^2) eps_hat + sigma z,
    x0_hat = (x_t - sqrt(1 - a) eps_hat) / sqrt(a)                       ("predicted x0")
with (eq. 16)
    sigma = eta sqrt((1 - a') / (1 - a)) sqrt(1 - a / a').
eta = 0 is the deterministic DDIM; eta = 1 makes sigma^2 the DDPM posterior variance beta_tilde, so
that the step is DDPM's ancestral step over the same pair (t, t'). After the last timestep, t' = -1
and a' = 1 (diffusers' ``set_alpha_to_one=True``): the step returns x0_hat.

With eta = 0 the step is Euler's method on the probability-flow ODE in xbar = x / sqrt(a),
sigma_bar = sqrt((1 - a) / a) (eq. 13-14): d xbar = eps(x, t) d sigma_bar. Running it with t' > t
encodes x0 into a latent x_T (``ddim_invert``, sec. 5.4); the network is queried at the target
timestep with the current sample, as diffusers' ``DDIMInverseScheduler`` does, since x0 has no
timestep of its own.

Timestep subsequences (``spacing``; diffusers' ``timestep_spacing``, Lin et al. 2024, "Common
Diffusion Noise Schedules and Sample Steps are Flawed", Table 2; and the DDIM paper's appendix D.2):
    leading:   tau_i = i * (T // S) + steps_offset,   i = 0..S-1
    trailing:  tau_i = round(T - i * T / S) - 1,       i = 0..S-1
    linspace:  tau_i = round(i * (T - 1) / (S - 1)),   i = 0..S-1
    quadratic: tau_i = floor((i * sqrt(0.8 T) / (S - 1))^2), raised to tau_{i-1} + 1 where floor()
               would repeat a timestep (only when S is large), so that there are always S steps.
Diffusers' ``DDIMScheduler.step`` takes the previous timestep as t - T // S, which is right for
``leading`` but not for ``trailing`` / ``linspace`` when the gaps are not T // S; here t' is the
next timestep of the subsequence itself, as in the paper.

Slerp between two noises (sec. 5.3, after White 2016):
    slerp(z0, z1, alpha) = sin((1 - alpha) theta) / sin(theta) z0 + sin(alpha theta) / sin(theta) z1,
    theta = arccos(<z0, z1> / (|z0| |z1|)).
"""

from __future__ import annotations

import math
import numbers

import torch

from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.diffusion.ddpm import Model, call_model, run_chain
from notelab.diffusion.parametrization import (
    Coef,
    as_coef,
    check_prediction_type,
    clip_or_threshold,
    eps_from_x0,
    predict_x0_eps,
)
from notelab.diffusion.schedules import NoiseSchedule

TIMESTEP_SPACINGS = ("leading", "trailing", "linspace", "quadratic")


def ddim_timesteps(
    num_train_timesteps: int, steps: int, spacing: str = "leading", steps_offset: int = 0
) -> torch.Tensor:
    """The S sampling timesteps, descending, as a ``(S,)`` int64 tensor (see the module docstring).

    ``steps_offset`` shifts ``leading`` timesteps as diffusers' option of that name (default 0).
    """
    T = num_train_timesteps
    if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or not 1 <= steps <= T:
        raise ConfigError(f"steps: expected an int in [1, num_train_timesteps={T}], got {steps!r}")
    S = int(steps)
    if spacing == "leading":
        ts = torch.arange(S, dtype=torch.float64) * (T // S) + steps_offset
    elif spacing == "trailing":
        ts = (T - torch.arange(S, dtype=torch.float64) * (T / S)).round() - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, T - 1, S, dtype=torch.float64).round()
    elif spacing == "quadratic":
        ts = (torch.linspace(0, math.sqrt(0.8 * T), S, dtype=torch.float64) ** 2).floor()
        ts = _strictly_increasing(ts)
    else:
        raise unknown_name("timestep spacing", spacing, TIMESTEP_SPACINGS)
    ts = ts.to(torch.int64)
    if spacing != "trailing":
        ts = ts.flip(0)
    if int(ts.min()) < 0 or int(ts.max()) >= T:
        raise ConfigError(
            f"steps_offset: timesteps must lie in [0, num_train_timesteps={T}), got {int(ts.min())}..{int(ts.max())}"
        )
    return ts


def _strictly_increasing(ts: torch.Tensor) -> torch.Tensor:
    # tau_i >= i, so the result never exceeds max(0.8 T, S - 1) < T
    out = ts.clone()
    for i in range(1, out.numel()):
        out[i] = max(out[i], out[i - 1] + 1)
    return out


def ddim_sigma(alpha_bar_t: Coef, alpha_bar_prev: Coef, eta: float) -> Coef:
    """sigma_t(eta) of eq. 16; exactly 0 for eta = 0, also where alpha_bar_t = 1 (inversion from x0)."""
    if eta == 0:
        return 0.0
    return eta * ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)) ** 0.5


def ddim_step(
    model_output: torch.Tensor,
    t: int | torch.Tensor,
    t_prev: int | torch.Tensor,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    eta: float = 0.0,
    prediction_type: str = "epsilon",
    noise: torch.Tensor | None = None,
    clip_sample: bool = False,
    thresholding: bool = False,
    *,
    clip_sample_range: float = 1.0,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
    use_clipped_model_output: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One generalised DDIM step x_t -> x_{t_prev} (eq. 12); ``t_prev < 0`` steps to x0.

    ``noise`` is the z of eq. 12 (drawn from ``generator`` when None and eta > 0).
    ``use_clipped_model_output`` re-derives eps from the clipped x0 (diffusers' option of that name).
    """
    if eta < 0:
        raise ConfigError(f"eta: expected eta >= 0, got {eta}")
    a_t, a_prev = schedule.alpha_bar(t, x_t), schedule.alpha_bar(t_prev, x_t)
    x0, eps = predict_x0_eps(model_output, x_t, a_t, prediction_type)
    x0 = clip_or_threshold(
        x0, clip_sample, clip_sample_range, thresholding, dynamic_thresholding_ratio, sample_max_value
    )
    if use_clipped_model_output:
        eps = eps_from_x0(x_t, x0, a_t)
    sigma = ddim_sigma(a_t, a_prev, eta)
    # 1 - a' - sigma^2 is >= 0 in exact arithmetic; rounding can take it a hair below
    dir_sq = 1 - a_prev - sigma**2
    dir_coef = dir_sq.clamp(min=0) ** 0.5 if isinstance(dir_sq, torch.Tensor) else max(dir_sq, 0.0) ** 0.5
    x_prev = as_coef(a_prev**0.5, x_t) * x0 + as_coef(dir_coef, x_t) * eps
    if eta > 0:
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
        x_prev = x_prev + as_coef(sigma, x_t) * noise
    return x_prev


def _check_batch(name: str, x: torch.Tensor) -> None:
    if x.ndim < 2:
        raise ShapeError(f"{name}: expected a batch of shape (B, ...), got {tuple(x.shape)}")


def sample_ddim(
    model: Model,
    x_T: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    eta: float = 0.0,
    spacing: str = "leading",
    prediction_type: str = "epsilon",
    clip_sample: bool = False,
    thresholding: bool = False,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """DDIM sampling from x_T in ``steps`` network calls; eta = 0 is deterministic."""
    _check_batch("sample_ddim", x_T)
    check_prediction_type(prediction_type)
    ts = ddim_timesteps(schedule.num_train_timesteps, steps, spacing).tolist()

    def step(x: torch.Tensor, t: int, t_prev: int) -> torch.Tensor:
        out = call_model(model, x, t)
        return ddim_step(
            out, t, t_prev, x, schedule, eta, prediction_type, None, clip_sample, thresholding, generator=generator
        )

    return run_chain(x_T, ts + [-1], step, progress, desc=f"DDIM {steps}")


def ddim_invert(
    model: Model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "leading",
    prediction_type: str = "epsilon",
    progress: bool = False,
) -> torch.Tensor:
    """Encode x0 into the DDIM latent x_T by running the eta = 0 step forwards (sec. 5.4).

    The latent sits at the first timestep ``sample_ddim`` uses for the same ``steps`` and
    ``spacing``, so ``sample_ddim(model, ddim_invert(...), ...)`` reconstructs x0.
    """
    _check_batch("ddim_invert", x0)
    check_prediction_type(prediction_type)
    ts = ddim_timesteps(schedule.num_train_timesteps, steps, spacing).flip(0).tolist()

    def step(x: torch.Tensor, t_from: int, t_to: int) -> torch.Tensor:
        # the network sees x (at level t_from) as if it were at t_to; eps is what carries over
        _, eps = predict_x0_eps(call_model(model, x, t_to), x, schedule.alpha_bar(t_to), prediction_type)
        return ddim_step(eps, t_from, t_to, x, schedule, eta=0.0)

    return run_chain(x0, [-1] + ts, step, progress, desc=f"DDIM inversion {steps}")


def ddim_reconstruct(
    model: Model,
    x0: torch.Tensor,
    schedule: NoiseSchedule,
    steps: int,
    spacing: str = "leading",
    prediction_type: str = "epsilon",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_T, x0_hat): invert x0 with ``steps`` DDIM steps, then decode with the same timesteps."""
    x_T = ddim_invert(model, x0, schedule, steps, spacing, prediction_type, progress)
    x0_hat = sample_ddim(model, x_T, schedule, steps, 0.0, spacing, prediction_type, progress=progress)
    return x_T, x0_hat


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float | torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between two noises, each taken as one vector.

    A float ``alpha`` gives a tensor shaped like ``z0``; a ``(K,)`` tensor of alphas gives
    ``(K, *z0.shape)``, e.g. a row of interpolated latents to decode as one batch.
    """
    if z0.shape != z1.shape:
        raise ShapeError(f"slerp: z0 {tuple(z0.shape)} and z1 {tuple(z1.shape)} must have the same shape")
    alpha_t = torch.as_tensor(alpha, dtype=z0.dtype, device=z0.device)
    if alpha_t.ndim > 1:
        raise ShapeError(f"slerp: alpha must be a float or a 1-D tensor, got shape {tuple(alpha_t.shape)}")
    a = alpha_t.reshape(-1, *([1] * z0.ndim))
    a0, a1 = z0.flatten(), z1.flatten()
    cos = (a0 @ a1 / (a0.norm() * a1.norm())).clamp(-1.0, 1.0)
    theta = torch.arccos(cos)
    if float(theta.sin()) < 1e-6:  # (anti)parallel: the arc is undefined, interpolate linearly
        out = (1 - a) * z0 + a * z1
    else:
        out = (torch.sin((1 - a) * theta) * z0 + torch.sin(a * theta) * z1) / torch.sin(theta)
    return out if alpha_t.ndim == 1 else out[0]
