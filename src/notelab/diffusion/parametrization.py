"""What the network predicts, and the conversions between the three choices.

With x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alpha_bar_t (Ho et al. 2020, eq. 4), the network may
predict (diffusers' ``prediction_type``):

- ``epsilon``: eps (Ho et al. 2020, eq. 11-14);        x0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
- ``sample``: x0 directly;                              eps = (x_t - sqrt(a) x0) / sqrt(1 - a)
- ``v_prediction``: v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022, "Progressive
  Distillation", sec. 4 and appendix D), from which    x0 = sqrt(a) x_t - sqrt(1 - a) v,
                                                        eps = sqrt(a) v + sqrt(1 - a) x_t.

The score is grad log q(x_t) = -eps / sqrt(1 - a) (Song et al. 2021, "Score-Based Generative
Modeling through SDEs", eq. 4 with the DDPM perturbation kernel).

``alpha_bar`` may be a Python float, or a ``(B,)`` tensor (one per sample): it is broadcast with
``append_dims``, so the same code serves points ``(B, D)`` and images ``(B, C, H, W)``.

Dynamic thresholding (Saharia et al. 2022, "Imagen", sec. 2.3): s = the ``ratio`` quantile of
|x0| per sample, s = clamp(s, 1, max_value), x0 <- clamp(x0, -s, s) / s.
"""

from __future__ import annotations

import torch

from notelab.core.errors import unknown_name
from notelab.core.tensor import append_dims

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")

Coef = float | torch.Tensor


def check_prediction_type(prediction_type: str) -> str:
    """Return ``prediction_type`` or raise a :class:`ConfigError` listing the known ones."""
    if prediction_type not in PREDICTION_TYPES:
        raise unknown_name("prediction_type", prediction_type, PREDICTION_TYPES)
    return prediction_type


def as_coef(a: Coef, x: torch.Tensor) -> Coef:
    """A float stays a float; a ``(B,)`` tensor moves to ``x``'s device and dtype and broadcasts.

    Coefficients are computed from alpha_bar in float64 and cast here, at their last step: 1 - a
    and 1 - a / a' lose most of their digits in float32 when a is close to 1 (small t).
    """
    if isinstance(a, torch.Tensor):
        a = a.to(device=x.device, dtype=x.dtype)
        if 1 <= a.ndim < x.ndim:
            a = append_dims(a, x.ndim)
    return a


def x0_from_eps(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar: Coef) -> torch.Tensor:
    a = alpha_bar
    return (x_t - as_coef((1 - a) ** 0.5, x_t) * eps) / as_coef(a**0.5, x_t)


def eps_from_x0(x_t: torch.Tensor, x0: torch.Tensor, alpha_bar: Coef) -> torch.Tensor:
    a = alpha_bar
    return (x_t - as_coef(a**0.5, x_t) * x0) / as_coef((1 - a) ** 0.5, x_t)


def v_from_x0_eps(x0: torch.Tensor, eps: torch.Tensor, alpha_bar: Coef) -> torch.Tensor:
    """v = sqrt(a) eps - sqrt(1 - a) x0 (Salimans & Ho 2022)."""
    a = alpha_bar
    return as_coef(a**0.5, x0) * eps - as_coef((1 - a) ** 0.5, x0) * x0


def x0_eps_from_v(v: torch.Tensor, x_t: torch.Tensor, alpha_bar: Coef) -> tuple[torch.Tensor, torch.Tensor]:
    sa, s1a = as_coef(alpha_bar**0.5, x_t), as_coef((1 - alpha_bar) ** 0.5, x_t)
    return sa * x_t - s1a * v, sa * v + s1a * x_t


def predict_x0_eps(
    model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar: Coef, prediction_type: str = "epsilon"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x0, eps) implied by the network's output at noise level ``alpha_bar``."""
    if prediction_type == "epsilon":
        return x0_from_eps(x_t, model_output, alpha_bar), model_output
    if prediction_type == "sample":
        return model_output, eps_from_x0(x_t, model_output, alpha_bar)
    if prediction_type == "v_prediction":
        return x0_eps_from_v(model_output, x_t, alpha_bar)
    raise unknown_name("prediction_type", prediction_type, PREDICTION_TYPES)


def model_target(
    x0: torch.Tensor, eps: torch.Tensor, alpha_bar: Coef, prediction_type: str = "epsilon"
) -> torch.Tensor:
    """What the network should output for the pair (x0, eps): the regression target of the loss."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return v_from_x0_eps(x0, eps, alpha_bar)
    raise unknown_name("prediction_type", prediction_type, PREDICTION_TYPES)


def score_from_eps(eps: torch.Tensor, alpha_bar: Coef) -> torch.Tensor:
    """grad_x log q(x_t) = -eps / sqrt(1 - alpha_bar)."""
    return -eps / as_coef((1 - alpha_bar) ** 0.5, eps)


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding of a predicted x0, per sample over all non-batch dims."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"dynamic_threshold: expected ratio in (0, 1], got {ratio}")
    dtype = x0.dtype
    # quantile needs float32/64 (and clamp has no CPU half kernel)
    flat = x0.reshape(x0.shape[0], -1)
    if dtype not in (torch.float32, torch.float64):
        flat = flat.float()
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1.0, max=max_value)[:, None]
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(dtype)


def clip_or_threshold(
    x0: torch.Tensor,
    clip_sample: bool = False,
    clip_sample_range: float = 1.0,
    thresholding: bool = False,
    dynamic_thresholding_ratio: float = 0.995,
    sample_max_value: float = 1.0,
) -> torch.Tensor:
    """Bound a predicted x0 as diffusers does: thresholding wins over clipping when both are set."""
    if thresholding:
        return dynamic_threshold(x0, dynamic_thresholding_ratio, sample_max_value)
    if clip_sample:
        return x0.clamp(-clip_sample_range, clip_sample_range)
    return x0
