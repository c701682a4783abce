"""Flow matching and rectified flow: train a :class:`ContinuousFlow`'s vector field by regression.

A probability path ``p_t(x | x_0, x_1)`` from noise ``x_0 ~ N(0, I)`` (t = 0) to data ``x_1``
(t = 1) has a conditional vector field ``u_t(x | x_0, x_1)``; the conditional flow matching loss
(Lipman et al. 2023, eq. 9; Tong et al. 2024, eq. 12)::

    L_CFM = E_{t ~ U[0, 1], (x_0, x_1) ~ pi, x ~ p_t(. | x_0, x_1)} || v(x, t) - u_t(x | x_0, x_1) ||^2

has the same gradient as regressing the marginal field, so its minimiser transports N(0, I) to
the data. Paths (``x_t`` and ``u_t`` as pure functions of ``x_0, x_1, t, eps``):

- :class:`LinearPath` (``sigma``): ``x_t = t x_1 + (1 - t) x_0 + sigma eps``, ``u_t = x_1 - x_0``
  (Tong et al.'s I-CFM; with ``sigma = 0`` Liu et al. 2023's rectified flow).
- :class:`OTPath` (``sigma_min``): Lipman et al. 2023 eq. 20-23,
  ``x_t = (1 - (1 - sigma_min) t) x_0 + t x_1``, ``u_t = x_1 - (1 - sigma_min) x_0``.
- :class:`VPPath` (``beta_min``, ``beta_max``): Lipman et al. 2023 eq. 18-19, the diffusion (VP)
  path ``x_t = alpha_{1-t} x_1 + sqrt(1 - alpha_{1-t}^2) x_0``, ``alpha_s = exp(-T(s) / 2)``,
  ``T(s) = int_0^s beta``, ``beta`` linear from ``beta_min`` to ``beta_max``.

The coupling ``pi`` is injected: :func:`independent` (x_0 and x_1 drawn apart) or :func:`ot_pairs`
(minibatch optimal transport, Tong et al. 2024's OT-CFM: x_0 re-ordered to minimise the summed
squared distance, exact by the Hungarian algorithm). Rectified flow's *reflow* (Liu et al. 2023,
sec. 2.2) trains a new field on the pairs ``(x_0, ODE(x_0))`` of the previous one; its paths are
straighter, so few Euler steps (even one) sample well.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.core.tensor import append_dims
from notelab.flows.continuous import ContinuousFlow, Solver


@dataclass(frozen=True)
class LinearPath:
    """``x_t = t x_1 + (1 - t) x_0 + sigma eps``, ``u_t = x_1 - x_0`` (I-CFM; rectified flow at sigma 0)."""

    sigma: float = 0.0

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        t = append_dims(t, x1.ndim)
        return t * x1 + (1 - t) * x0 + self.sigma * eps

    def velocity(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return x1 - x0


@dataclass(frozen=True)
class OTPath:
    """Lipman's conditional OT path: ``x_t = (1 - (1 - sigma_min) t) x_0 + t x_1``, ``u_t = x_1 - (1 - sigma_min) x_0``.

    (The docstring of the module gives the equations' sources.)
    """

    sigma_min: float = 1e-4

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        t = append_dims(t, x1.ndim)
        return (1 - (1 - self.sigma_min) * t) * x0 + t * x1

    def velocity(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return x1 - (1 - self.sigma_min) * x0


@dataclass(frozen=True)
class VPPath:
    """Lipman's variance-preserving (diffusion) path; ``u_t = d/dt x_t`` along the conditional flow map."""

    beta_min: float = 0.1
    beta_max: float = 20.0

    def alpha(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``alpha_s = exp(-T(s) / 2)`` and ``beta(s)``, ``T(s) = beta_min s + (beta_max - beta_min) s^2 / 2``."""
        big_t = self.beta_min * s + (self.beta_max - self.beta_min) * s**2 / 2
        return torch.exp(-big_t / 2), self.beta_min + (self.beta_max - self.beta_min) * s

    def sample(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        a, _ = self.alpha(append_dims(1 - t, x1.ndim))
        return a * x1 + (1 - a**2).sqrt() * x0

    def velocity(self, x0: torch.Tensor, x1: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        # With s = 1 - t: d alpha / dt = beta alpha / 2 and
        # d sqrt(1 - alpha^2) / dt = -alpha^2 beta / (2 sqrt(1 - alpha^2)).
        a, beta = self.alpha(append_dims(1 - t, x1.ndim))
        sigma = (1 - a**2).clamp_min(1e-12).sqrt()
        return beta * a / 2 * x1 - a**2 * beta / (2 * sigma) * x0


PATHS = {"linear": LinearPath, "ot": OTPath, "vp": VPPath}
Pairing = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def independent(x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The independent coupling ``pi = p_0 x p_1``: the pairs as drawn."""
    return x0, x1


def ot_pairs(x0: torch.Tensor, x1: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Minibatch optimal transport (OT-CFM): ``x0`` permuted to minimise ``sum_i |x0_i - x1_i|^2``.

    With equal uniform weights the exact OT plan is a permutation (Birkhoff), found by the
    Hungarian algorithm (scipy's ``linear_sum_assignment``).
    """
    from scipy.optimize import linear_sum_assignment

    cost = torch.cdist(x0.reshape(len(x0), -1).double(), x1.reshape(len(x1), -1).double()).pow(2)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    order = torch.empty(len(x1), dtype=torch.long)
    order[torch.as_tensor(cols)] = torch.as_tensor(rows)
    return x0[order.to(x0.device)], x1


@dataclass
class FlowMatchingLoss:
    """``fit``'s loss: the conditional flow matching loss (module docstring) for a path and a coupling.

    The batch is data ``x_1`` (then ``x_0`` is drawn from N(0, I) and paired by ``pairing``), or,
    for reflow, pairs stacked as ``(B, 2, *sample_shape)`` with ``[:, 0] = x_0``, ``[:, 1] = x_1``.
    """

    path: LinearPath | OTPath | VPPath = LinearPath()
    pairing: Pairing = independent
    pairs: bool = False  # the batch holds (x_0, x_1) pairs (reflow)

    def __call__(
        self, model: ContinuousFlow, batch: torch.Tensor, generator: torch.Generator
    ) -> tuple[torch.Tensor, dict[str, float]]:
        if self.pairs:
            x0, x1 = batch[:, 0], batch[:, 1]
        else:
            x1 = batch
            x0 = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
            x0, x1 = self.pairing(x0, x1)
        t = torch.rand(x1.shape[0], generator=generator, device=x1.device, dtype=x1.dtype)
        eps = torch.randn(x1.shape, generator=generator, device=x1.device, dtype=x1.dtype)
        xt = self.path.sample(x0, x1, t, eps)
        target = self.path.velocity(x0, x1, t, eps)
        return (model(xt, t) - target).pow(2).mean(), {}


@torch.no_grad()
def reflow_pairs(
    model: ContinuousFlow,
    n: int,
    solver: Solver | None = None,
    generator: torch.Generator | None = None,
    batch: int = 4096,
) -> torch.Tensor:
    """Rectified flow's new coupling: ``n`` pairs ``(x_0, ODE_v(x_0))`` stacked as ``(n, 2, *sample_shape)``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"reflow_pairs: expected a number of pairs n >= 1, got {n!r}")
    out = []
    for k in range(0, n, batch):
        x0 = model.noise(min(batch, n - k), generator)
        x1, _ = model.sample(len(x0), solver or Solver(), x0=x0)
        out.append(torch.stack([x0, x1], dim=1))
    return torch.cat(out)


def straightness(model: ContinuousFlow, x0: torch.Tensor, steps: int = 20) -> float:
    """Liu et al.'s straightness ``S = int_0^1 E |(x_1 - x_0) - v(x_t, t)|^2 dt`` along Euler paths (0: straight)."""
    if steps < 1:
        raise ConfigError(f"straightness: expected steps >= 1, got {steps}")
    if x0.ndim < 2:
        raise ShapeError(f"straightness: expected x0 of shape (B, ...), got {tuple(x0.shape)}")
    with torch.no_grad():
        x0 = x0.to(next(iter(model.parameters())).device)
        xs, vs, x = [x0], [], x0
        for k in range(steps):
            v = model(x, k / steps)
            vs.append(v)
            x = x + v / steps
            xs.append(x)
        chord = xs[-1] - xs[0]
        return float(sum((chord - v).pow(2).flatten(1).sum(1).mean() for v in vs) / steps)


def gaussian_path_moments(t: float, mean1: float, std1: float) -> tuple[float, float]:
    """Mean and variance per coordinate of ``x_t = t x_1 + (1 - t) x_0`` for ``x_0 ~ N(0, 1)``, ``x_1 ~ N(m, s^2)``."""
    return t * mean1, (1 - t) ** 2 + t**2 * std1**2


def gaussian_marginal_velocity(x: torch.Tensor, t: float, mean1: float, std1: float) -> torch.Tensor:
    """The marginal field ``E[x_1 - x_0 | x_t = x]`` of the linear path between N(0, I) and N(m, s^2 I).

    ``(x_1 - x_0, x_t)`` is jointly Gaussian: ``u(x) = m + c / var (x - t m)`` with
    ``c = Cov(x_1 - x_0, x_t) = t s^2 - (1 - t)`` and ``var = (1 - t)^2 + t^2 s^2`` per coordinate.
    """
    mean, var = gaussian_path_moments(t, mean1, std1)
    c = t * std1**2 - (1 - t)
    return mean1 + c / var * (x - mean)


def gaussian_loss_floor(std1: float, points: int = 2001) -> float:
    """The least conditional flow matching loss per coordinate between N(0, I) and N(m, s^2 I).

    At each t the CFM loss minus that of the marginal field is the conditional variance
    ``Var(x_1 - x_0) - c^2 / var = (1 + s^2) - c^2 / var``; averaged over t by Simpson's rule.
    """
    ts = torch.linspace(0, 1, points, dtype=torch.float64)
    var = (1 - ts) ** 2 + ts**2 * std1**2
    c = ts * std1**2 - (1 - ts)
    g = (1 + std1**2) - c**2 / var
    w = torch.ones(points, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return float((w * g).sum() / (3 * (points - 1)))
