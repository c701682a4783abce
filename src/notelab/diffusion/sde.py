"""Score-based diffusion through SDEs (Song et al. 2021, "Score-Based Generative Modeling through
Stochastic Differential Equations"; equation numbers from the ICLR paper and its appendix).

Forward SDE (eq. 5):            dx = f(x, t) dt + g(t) dw,            t in [0, T]
Reverse-time SDE (eq. 6):       dx = [f(x, t) - g(t)^2 s(x, t)] dt + g(t) dw_bar
Probability-flow ODE (eq. 13):  dx = [f(x, t) - g(t)^2 s(x, t) / 2] dt
with s(x, t) = grad_x log p_t(x) the score. ``reverse`` / ``probability_flow`` are derived once here
from any SDE's ``drift`` / ``diffusion``; a subclass defines only the forward process.

Every SDE here is linear, so x_t | x_0 ~ N(m(t) x_0, s(t)^2 I) (``marginal_coefs``):
  VE (eq. 30, SMLD):  f = 0, g = sigma(t) sqrt(2 log(sigma_max / sigma_min)),
                      sigma(t) = sigma_min (sigma_max / sigma_min)^t;
                      m = 1, s^2 = sigma(t)^2 - sigma_min^2 (the exact transition; the reference code
                      uses s = sigma(t), whose variance exceeds the SDE's by sigma_min^2 = 1e-4).
  VP (eq. 32, DDPM):  beta(t) = beta_min + t (beta_max - beta_min), f = -beta(t) x / 2, g = sqrt(beta(t));
                      log m = -t^2 (beta_max - beta_min) / 4 - t beta_min / 2,  s^2 = 1 - m^2   (eq. 33)
  sub-VP (eq. 34):    f as VP, g = sqrt(beta(t) (1 - exp(-2 beta_min t - (beta_max - beta_min) t^2)));
                      m as VP, s = 1 - m^2                                                  (eq. 29)
Priors: N(0, sigma_max^2 I) for VE (whose p_T is N(0, sigma_max^2 - sigma_min^2) plus the data), N(0, I)
otherwise.

Discretisations with ``N`` steps (appendix E, "reverse diffusion"), i = floor(t (N - 1) / T):
  VE: x_i = x_{i-1} + sqrt(sigma_i^2 - sigma_{i-1}^2) z, sigma_i = exp(linspace(log sigma_min, log sigma_max, N))_i
  VP / sub-VP: x_i = sqrt(1 - beta_i) x_{i-1} + sqrt(beta_i) z, beta_i = linspace(beta_min / N, beta_max / N, N)_i,
  which for beta_min = T' beta_1, beta_max = T' beta_T' are DDPM's linear betas over T' = N steps;
  sub-VP: Euler-Maruyama with dt = T / N.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import torch

from notelab.core.errors import ConfigError
from notelab.core.tensor import append_dims

Score = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SDE_NAMES = ("ve", "vp", "subvp")


def _positive(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: expected a finite number > 0, got {value!r}")


def _time(t: torch.Tensor | float, x: torch.Tensor) -> torch.Tensor:
    """t as a ``(B,)`` tensor in x's float dtype (the coefficients below are per sample)."""
    t = torch.as_tensor(t, device=x.device, dtype=x.dtype if x.is_floating_point() else torch.float32)
    return t.expand(x.shape[0]) if t.ndim == 0 else t


@dataclass(frozen=True)
class SDE:
    """A linear forward SDE dx = f(x, t) dt + g(t) dw on [0, T] with its ``N``-step discretisation.

    Subclasses give ``drift``, ``g``, ``marginal_coefs``, ``prior_std`` and ``discrete_transition``.
    """

    N: int = 1000

    @property
    def T(self) -> float:
        return 1.0

    def __post_init__(self) -> None:
        if isinstance(self.N, bool) or not isinstance(self.N, numbers.Integral) or self.N < 1:
            raise ConfigError(f"N: expected an int >= 1 (discretisation steps), got {self.N!r}")

    def with_steps(self, N: int) -> SDE:
        """The same SDE discretised in ``N`` steps."""
        return dataclasses.replace(self, N=N)

    # -- the forward process, per subclass
    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def g(self, t: torch.Tensor) -> torch.Tensor:
        """The diffusion coefficient g(t), shape (B,)."""
        raise NotImplementedError

    def marginal_coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(m(t), s(t)) of x_t | x_0 ~ N(m x_0, s^2 I), each shape (B,)."""
        raise NotImplementedError

    def prior_std(self) -> float:
        raise NotImplementedError

    def discrete_transition(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(a_i, b_i) of a discretised step x_i = a_i x_{i-1} + b_i z at i = floor(t (N - 1) / T),
        or None where the SDE has none of its own (then ``discretize`` is Euler-Maruyama)."""
        return None

    def langevin_alpha(self, t: torch.Tensor) -> torch.Tensor:
        """The step-size factor of the Langevin corrector (Algorithm 5): alpha_i = 1 - beta_i for VP-type."""
        return torch.ones_like(t)

    # -- derived once for every SDE
    def sde(self, x: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(f(x, t), g(t)) with g shaped (B,)."""
        t = _time(t, x)
        return self.drift(x, t), self.g(t)

    def marginal_prob(self, x0: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean m(t) x0, std s(t)) of p_0t(x_t | x0); std shaped (B,)."""
        t = _time(t, x0)
        lo, hi = float(t.min()), float(t.max())
        if lo < 0 or hi > self.T:
            raise ConfigError(f"marginal_prob: t must lie in [0, T={self.T}], got {lo}..{hi}")
        m, s = self.marginal_coefs(t)
        return append_dims(m, x0.ndim) * x0, s

    def prior_sampling(self, shape: tuple[int, ...], generator: torch.Generator | None = None, **kw) -> torch.Tensor:
        return torch.randn(shape, generator=generator, **kw) * self.prior_std()

    def prior_logp(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, prior_std^2 I) per sample."""
        d = z[0].numel()
        s2 = self.prior_std() ** 2
        return -0.5 * d * math.log(2 * math.pi * s2) - z.flatten(1).pow(2).sum(1) / (2 * s2)

    def discretize(self, x: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_i, G_i) of the discrete step x_{i+1} = x_i + f_i + G_i z: the SDE's own discretisation
        (``discrete_transition``), else Euler-Maruyama with dt = T / N (f_i = f dt, G_i = g sqrt(dt))."""
        t = _time(t, x)
        ab = self.discrete_transition(t)
        if ab is None:
            dt = self.T / self.N
            f, g = self.sde(x, t)
            return f * dt, g * math.sqrt(dt)
        a, b = ab
        return (append_dims(a, x.ndim) - 1) * x, b

    def check_discretization(self) -> None:
        """Raise :class:`ConfigError` when the N-step discretisation is not a valid chain."""

    def discrete_index(self, t: torch.Tensor) -> torch.Tensor:
        return (t * (self.N - 1) / self.T).long().clamp(0, self.N - 1)

    def reverse(self, score_fn: Score, probability_flow: bool = False) -> ReverseSDE:
        """The reverse-time SDE (eq. 6) or, with ``probability_flow``, the ODE of eq. 13."""
        return ReverseSDE(self, score_fn, probability_flow)

    def probability_flow(self, score_fn: Score) -> ReverseSDE:
        return ReverseSDE(self, score_fn, True)


@dataclass(frozen=True)
class ReverseSDE:
    """dx = [f - c g^2 s] dt + [c = 1] g dw_bar, c = 1 (reverse SDE) or 1/2 (probability flow)."""

    forward: SDE
    score_fn: Score
    probability_flow: bool = False

    def sde(self, x: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        t = _time(t, x)
        f, g = self.forward.sde(x, t)
        c = 0.5 if self.probability_flow else 1.0
        drift = f - append_dims(g**2, x.ndim) * self.score_fn(x, t) * c
        return drift, torch.zeros_like(g) if self.probability_flow else g

    def discretize(self, x: torch.Tensor, t: torch.Tensor | float) -> tuple[torch.Tensor, torch.Tensor]:
        """The reverse of the forward discretisation (eq. 46-47): x_{i-1} = x_i - (f_i - G_i^2 s) + G_i z."""
        t = _time(t, x)
        f, G = self.forward.discretize(x, t)
        c = 0.5 if self.probability_flow else 1.0
        rev_f = f - append_dims(G**2, x.ndim) * self.score_fn(x, t) * c
        return rev_f, torch.zeros_like(G) if self.probability_flow else G


@dataclass(frozen=True)
class VESDE(SDE):
    """Variance exploding (SMLD / NCSN) SDE, eq. 30."""

    sigma_min: float = 0.01
    sigma_max: float = 50.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("sigma_min", self.sigma_min)
        _positive("sigma_max", self.sigma_max)
        if self.sigma_max <= self.sigma_min:
            raise ConfigError(f"sigma_max: expected > sigma_min={self.sigma_min}, got {self.sigma_max}")

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma_min * (self.sigma_max / self.sigma_min) ** t

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(x)

    def g(self, t: torch.Tensor) -> torch.Tensor:
        return self.sigma(t) * math.sqrt(2 * math.log(self.sigma_max / self.sigma_min))

    def marginal_coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ones_like(t), (self.sigma(t) ** 2 - self.sigma_min**2).clamp(min=0).sqrt()

    def prior_std(self) -> float:
        return self.sigma_max

    def discrete_sigmas(self, like: torch.Tensor) -> torch.Tensor:
        lo, hi = math.log(self.sigma_min), math.log(self.sigma_max)
        return torch.linspace(lo, hi, self.N, dtype=torch.float64).exp().to(like.device, like.dtype)

    def discrete_transition(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.discrete_index(t)
        sig = self.discrete_sigmas(t)
        prev = torch.where(i == 0, torch.zeros_like(t), sig[(i - 1).clamp(min=0)])
        return torch.ones_like(t), (sig[i] ** 2 - prev**2).sqrt()


@dataclass(frozen=True)
class VPSDE(SDE):
    """Variance preserving (DDPM) SDE, eq. 32."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _positive("beta_min", self.beta_min)
        _positive("beta_max", self.beta_max)
        if self.beta_max < self.beta_min:
            raise ConfigError(f"beta_max: expected >= beta_min={self.beta_min}, got {self.beta_max}")

    def beta(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def log_mean_coeff(self, t: torch.Tensor) -> torch.Tensor:
        return -0.25 * t**2 * (self.beta_max - self.beta_min) - 0.5 * t * self.beta_min

    def drift(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return -0.5 * append_dims(self.beta(t), x.ndim) * x

    def g(self, t: torch.Tensor) -> torch.Tensor:
        return self.beta(t).sqrt()

    def marginal_coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lm = self.log_mean_coeff(t)
        return lm.exp(), (-torch.expm1(2 * lm)).sqrt()

    def prior_std(self) -> float:
        return 1.0

    def discrete_betas(self, like: torch.Tensor) -> torch.Tensor:
        b = torch.linspace(self.beta_min / self.N, self.beta_max / self.N, self.N, dtype=torch.float64)
        return b.to(like.device, like.dtype)

    def discrete_transition(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        beta = self.discrete_betas(t)[self.discrete_index(t)]
        return (1 - beta).sqrt(), beta.sqrt()

    def langevin_alpha(self, t: torch.Tensor) -> torch.Tensor:
        return 1 - self.discrete_betas(t)[self.discrete_index(t)]

    def check_discretization(self) -> None:
        # beta_i = beta_max / N must stay below 1 for sqrt(1 - beta_i)
        if self.beta_max / self.N >= 1:
            raise ConfigError(
                f"steps: the VP chain's betas reach beta_max / steps = {self.beta_max / self.N:.3g} >= 1; "
                f"use more than {self.beta_max:g} steps (or the em / ode sampler), got {self.N}"
            )

    @classmethod
    def from_ddpm(cls, beta_start: float, beta_end: float, num_train_timesteps: int) -> VPSDE:
        """The VP SDE whose N-step discretisation is DDPM's linear schedule beta_start..beta_end over T steps."""
        T = num_train_timesteps
        return cls(N=T, beta_min=beta_start * T, beta_max=beta_end * T)


@dataclass(frozen=True)
class SubVPSDE(VPSDE):
    """The sub-VP SDE, eq. 34: VP's drift, a smaller diffusion, so its variance is bounded by VP's."""

    def g(self, t: torch.Tensor) -> torch.Tensor:
        discount = -torch.expm1(-2 * self.beta_min * t - (self.beta_max - self.beta_min) * t**2)
        return (self.beta(t) * discount).sqrt()

    def marginal_coefs(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lm = self.log_mean_coeff(t)
        return lm.exp(), -torch.expm1(2 * lm)

    def discrete_transition(self, t: torch.Tensor) -> None:
        return None  # as the reference: sub-VP has no ancestral chain; Euler-Maruyama instead

    def check_discretization(self) -> None:
        return None


SDES: dict[str, type[SDE]] = {"ve": VESDE, "vp": VPSDE, "subvp": SubVPSDE}
