"""Continuous normalizing flows: a vector field ``v(x, t)`` carries noise (t = 0) to data (t = 1).

Sampling solves ``dx/dt = v(x, t)`` from ``x_0 ~ N(0, I)`` to ``t = 1``. The log-density follows
the instantaneous change of variables (Chen et al. 2018, Neural ODEs, thm. 1)::

    d log p_t(x_t) / dt = -div v(x_t, t)
    log p_1(x_1) = log p_0(x_0) - int_0^1 div v(x_t, t) dt

computed by solving the augmented state ``[x, a]`` with ``da/dt = div v`` backwards from
``(x_1, 0)`` at t = 1 to t = 0, so that ``a(0) = -int_0^1 div v dt`` and
``log p_1(x_1) = log p_0(x_0) + a(0)``. The divergence is exact (one vector-Jacobian product per
dimension) or Hutchinson's estimate with probe vectors held fixed over the solve (FFJORD,
Grathwohl et al. 2019, eq. 7-8). All integration goes through :mod:`notelab.core.integrate`:
fixed steps (``euler``, ``heun``, ``rk4``) or adaptive ``dopri5`` through torchdiffeq (with the
adjoint method when asked).

The same model serves a CNF trained by maximum likelihood (FFJORD), flow matching and
rectified flow (:mod:`notelab.flows.matching`): only the training loss differs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from notelab.core.checkpoint import PretrainedMixin
from notelab.core.config import config_from_dict, config_to_dict
from notelab.core.denoisers import MLPDenoiser, MLPDenoiserConfig, UNet, UNetConfig
from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.core.integrate import (
    ADAPTIVE_METHODS,
    counted,
    divergence,
    euler,
    heun,
    integrate,
    odeint,
    probe_noise,
    rk4,
)
from notelab.flows.priors import StandardNormal

FIXED_STEPPERS = {"euler": euler, "heun": heun, "rk4": rk4}
SOLVERS = (*FIXED_STEPPERS, *ADAPTIVE_METHODS)
NETS = {"mlp": (MLPDenoiser, MLPDenoiserConfig), "unet": (UNet, UNetConfig)}


@dataclass
class Solver:
    """How to solve an ODE: a fixed-step rule with ``steps`` steps, or an adaptive torchdiffeq method."""

    method: str = "dopri5"  # "euler", "heun", "rk4" (fixed steps) or "dopri5", ... (adaptive)
    steps: int = 20  # steps of a fixed-step method
    rtol: float = 1e-5  # tolerances of an adaptive method
    atol: float = 1e-5
    adjoint: bool = False  # adaptive only: gradients by the adjoint ODE (memory O(1) in steps)

    def __post_init__(self) -> None:
        if self.method not in SOLVERS:
            raise unknown_name("ODE solver", self.method, SOLVERS)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"Solver.steps: expected an integer >= 1, got {self.steps!r}")


def solve(
    f: Any, x: torch.Tensor, t0: float, t1: float, solver: Solver, params: Any = None
) -> tuple[torch.Tensor, int]:
    """``x(t1)`` for ``dx/dt = f(x, t)``, ``x(t0) = x``, and the number of evaluations of ``f``."""
    g = counted(f)
    if solver.method in FIXED_STEPPERS:
        times = torch.linspace(t0, t1, solver.steps + 1).tolist()
        return integrate(x, times, FIXED_STEPPERS[solver.method](g)), g.nfe
    out = odeint(g, x, [t0, t1], solver.method, solver.rtol, solver.atol, solver.adjoint, adjoint_params=params)
    return out, g.nfe


def default_net_config(sample_shape: tuple[int, ...]) -> tuple[str, dict[str, Any]]:
    """An MLP for points ``(D,)``, a small UNet for square images ``(C, H, H)`` (t in [0, 1] scaled by 1000)."""
    if len(sample_shape) == 1:
        return "mlp", {"dim": sample_shape[0], "hidden": 128, "n_layers": 3, "time_dim": 32, "time_scale": 1000.0}
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise ConfigError(f"sample_shape: expected (D,) or square images (C, H, H), got {tuple(sample_shape)}")
    c, size = sample_shape[0], sample_shape[1]
    mults = (1, 2) if size <= 8 else (1, 2, 2)
    return "unet", {
        "in_channels": c,
        "image_size": size,
        "base_channels": 32 if size <= 16 else 64,
        "channel_mults": mults,
        "num_res_blocks": 1 if size <= 8 else 2,
        "time_scale": 1000.0,
    }


@dataclass
class ContinuousFlowConfig:
    sample_shape: tuple[int, ...] = (2,)  # one sample: (D,) points or (C, H, W) images
    net: str = ""  # "mlp" or "unet" (notelab.core.denoisers); "" picks by sample_shape
    net_config: dict[str, Any] = field(default_factory=dict)  # fields of MLPDenoiserConfig / UNetConfig

    def __post_init__(self) -> None:
        self.sample_shape = tuple(int(s) for s in self.sample_shape)
        if not self.sample_shape or any(s < 1 for s in self.sample_shape):
            raise ConfigError(f"ContinuousFlowConfig.sample_shape: expected positive sizes, got {self.sample_shape}")
        default_net, default = default_net_config(self.sample_shape)
        self.net = self.net or default_net
        if self.net not in NETS:
            raise unknown_name("net", self.net, NETS)
        merged = {**(default if self.net == default_net else {}), **self.net_config}
        try:
            self.net_config = config_to_dict(config_from_dict(NETS[self.net][1], merged))
        except ValueError as e:
            raise ConfigError(f"ContinuousFlowConfig.net_config: {e}") from e

    @property
    def dim(self) -> int:
        return math.prod(self.sample_shape)


class ContinuousFlow(PretrainedMixin, nn.Module):
    """A vector field ``v(x, t)`` with a standard Gaussian at t = 0 (module docstring)."""

    config_class = ContinuousFlowConfig
    model_type = "continuous_flow"

    def __init__(self, config: ContinuousFlowConfig) -> None:
        super().__init__()
        self.config = config
        net_cls, net_config_cls = NETS[config.net]
        self.net = net_cls(config_from_dict(net_config_cls, config.net_config))
        self.base = StandardNormal(config.dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor | float) -> torch.Tensor:
        """``v(x, t)`` for x of shape (B, *sample_shape) and t a float or shape (B,)."""
        t = torch.as_tensor(t, device=x.device, dtype=x.dtype).reshape(-1).expand(x.shape[0])
        return self.net(x, t)

    def check_x(self, x: torch.Tensor, who: str) -> None:
        shape = tuple(self.config.sample_shape)
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or tuple(x.shape[1:]) != shape:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"{who}: expected x of shape (B, {', '.join(map(str, shape))}), got {got}")
        if not bool(torch.isfinite(x).all()):
            raise ShapeError(f"{who}: expected finite values, got {int((~torch.isfinite(x)).sum())} NaN/inf")

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    def noise(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` draws of the base ``N(0, I)``, shaped ``(n, *sample_shape)``."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ConfigError(f"sample: expected a number of samples n >= 1, got {n!r}")
        return torch.randn(n, *self.config.sample_shape, generator=generator, device=self.device)

    @torch.no_grad()
    def sample(
        self,
        n: int,
        solver: Solver | None = None,
        generator: torch.Generator | None = None,
        x0: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Samples ``x(1)`` from ``x(0) = x0`` (default: ``n`` base draws), and the NFE it took."""
        x0 = self.noise(n, generator) if x0 is None else x0.to(self.device)
        return solve(self, x0, 0.0, 1.0, solver or Solver())

    def encode(self, x: torch.Tensor, solver: Solver | None = None) -> torch.Tensor:
        """``x(0)`` from ``x(1) = x``: the latent of a data point (the ODE run backwards)."""
        self.check_x(x, "encode")
        return solve(self, x, 1.0, 0.0, solver or Solver())[0]

    def log_prob(
        self,
        x: torch.Tensor,
        solver: Solver | None = None,
        method: str = "exact",
        probes: int = 1,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """``log p_1(x)`` per row by the instantaneous change of variables (module docstring).

        ``method``: "exact" or "hutchinson" divergence; Hutchinson's ``probes`` Rademacher vectors
        are drawn once from ``generator`` and held over the whole solve, so the integrand is one
        smooth function of t (FFJORD). Differentiable when autograd is on (maximum-likelihood
        training); ``solver.adjoint`` then trades compute for memory.
        """
        self.check_x(x, "log_prob")
        solver = solver or Solver()
        b, d = x.shape[0], self.config.dim
        noise = probe_noise(x, probes, generator=generator) if method == "hutchinson" else None

        def augmented(state: torch.Tensor, t: Any) -> torch.Tensor:
            y = state[:, :d].reshape(x.shape)
            v, div = divergence(lambda z: self(z, t), y, method, probes, noise=noise)
            return torch.cat([v.reshape(b, d), div[:, None].to(state.dtype)], dim=1)

        start = torch.cat([x.reshape(b, d), x.new_zeros(b, 1)], dim=1)
        end, _ = solve(augmented, start, 1.0, 0.0, solver, params=tuple(self.parameters()))
        return self.base.log_prob(end[:, :d]) + end[:, d]


def cnf_nll_loss(
    model: ContinuousFlow, batch: torch.Tensor, generator: torch.Generator, solver: Solver, method: str = "exact"
) -> tuple[torch.Tensor, dict[str, float]]:
    """FFJORD's maximum-likelihood loss for ``fit``: ``-log p(x)`` per dimension, through the ODE solve."""
    log_p = model.log_prob(batch, solver, method=method, generator=generator)
    return -log_p.mean() / model.config.dim, {}
