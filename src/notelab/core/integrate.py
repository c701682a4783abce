"""ODE / SDE integration: the one loop every sampler runs, fixed-step and adaptive solvers, and the
divergence for the instantaneous change of variables.

``integrate(x, times, step)`` applies x_{k+1} = step(x_k, t_k, t_{k+1}) over consecutive float
times (increasing or decreasing). A sampler is a ``step``; the steppers below build one from a
vector field f(x, t), for dx/dt = f(x, t), with h = t_{k+1} - t_k:

    Euler (order 1):  x' = x + h f(x, t)
    Heun  (order 2):  k1 = f(x, t), k2 = f(x + h k1, t + h),  x' = x + h (k1 + k2) / 2
    RK4   (order 4):  k1 = f(x, t), k2 = f(x + h k1 / 2, t + h / 2), k3 = f(x + h k2 / 2, t + h / 2),
                      k4 = f(x + h k3, t + h),  x' = x + h (k1 + 2 k2 + 2 k3 + k4) / 6
    (Hairer, Norsett & Wanner, "Solving Ordinary Differential Equations I", sec. II.1).

``odeint`` is the adaptive Dormand-Prince (dopri5) solver and its kin from torchdiffeq (Chen et al.
2018, "Neural Ordinary Differential Equations"), optionally with the adjoint method for memory.

``divergence`` returns div f(x) = tr(df/dx) per sample, which the instantaneous change of variables
d log p(x(t)) / dt = -tr(df/dx) (Chen et al. 2018, thm. 1) needs:
    exact:       sum_i d f_i / d x_i, one vector-Jacobian product per dimension;
    hutchinson:  E_v[v^T (df/dx) v] with E[v v^T] = I, v Rademacher or Gaussian (Hutchinson 1990;
                 Skilling 1989; Grathwohl et al. 2019, "FFJORD", eq. 7), ``probes`` draws averaged.

The number of function evaluations (NFE) is counted by :class:`NFECounter`: every stepper wraps its
f in one (read ``step.nfe``); pass ``counted(f)`` to ``odeint`` and read its ``nfe`` after.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from notelab.core.errors import ConfigError, ShapeError, unknown_name

Field = Callable[[torch.Tensor, float], torch.Tensor]
Step = Callable[[torch.Tensor, float, float], torch.Tensor]

ADAPTIVE_METHODS = ("dopri5", "dopri8", "bosh3", "adaptive_heun", "fehlberg2")
FIXED_METHODS = ("euler", "midpoint", "heun3", "rk4")
DIVERGENCE_METHODS = ("exact", "hutchinson")
PROBE_DISTRIBUTIONS = ("rademacher", "gaussian")


class NFECounter:
    """A vector field that counts its calls: ``g = NFECounter(f); g(x, t); g.nfe == 1``."""

    def __init__(self, f: Callable[..., Any]) -> None:
        if not callable(f):
            raise ConfigError(f"NFECounter: expected a callable f(x, t), got {type(f).__name__}")
        self.f = f
        self.nfe = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.nfe += 1
        return self.f(*args, **kwargs)

    def reset(self) -> None:
        self.nfe = 0


def counted(f: Callable[..., Any]) -> NFECounter:
    """``f`` as an :class:`NFECounter` (itself when it already is one, so counts accumulate)."""
    return f if isinstance(f, NFECounter) else NFECounter(f)


def check_times(times: Sequence[float] | torch.Tensor, name: str = "times", min_len: int = 2) -> list[float]:
    """``times`` as a list of finite floats, strictly monotone (either direction), at least ``min_len``."""
    if isinstance(times, torch.Tensor):
        if times.ndim != 1:
            raise ShapeError(f"{name}: expected a 1-D tensor of times, got shape {tuple(times.shape)}")
        ts = [float(v) for v in times.detach().cpu().tolist()]
    else:
        try:
            ts = [float(v) for v in times]
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{name}: expected a sequence of floats, got {times!r}") from e
    if len(ts) < min_len:
        raise ConfigError(f"{name}: expected at least {min_len} times, got {len(ts)}")
    if not all(math.isfinite(v) for v in ts):
        raise ConfigError(f"{name}: expected finite times, got {ts}")
    d = [b - a for a, b in zip(ts, ts[1:])]
    if not (all(v > 0 for v in d) or all(v < 0 for v in d)):
        raise ConfigError(f"{name}: expected strictly increasing or strictly decreasing times, got {ts}")
    return ts


def integrate(
    x: torch.Tensor,
    times: Sequence[float] | torch.Tensor,
    step: Step,
    progress: bool = False,
    *,
    desc: str = "integrate",
) -> torch.Tensor:
    """x_{k+1} = step(x_k, t_k, t_{k+1}) for consecutive times; returns the state at times[-1].

    Autograd follows the caller's context (samplers call it under ``torch.no_grad``; a
    continuous flow trained through a fixed-step solver backpropagates through it).
    A ``step`` built by :func:`euler` / :func:`heun` / :func:`rk4` reports its NFE as ``step.nfe``.
    """
    if not isinstance(x, torch.Tensor):
        raise ShapeError(f"integrate: expected x to be a tensor, got {type(x).__name__}")
    ts = check_times(times, "integrate: times")
    for t0, t1 in tqdm(list(zip(ts, ts[1:])), desc=desc, disable=not progress, leave=False):
        x = step(x, t0, t1)
    return x


class FixedStep:
    """One step of an explicit Runge-Kutta rule applied to a counted vector field (see module doc)."""

    def __init__(self, f: Field, rule: Callable[[Field, torch.Tensor, float, float], torch.Tensor], name: str):
        self.f = counted(f)
        self.rule = rule
        self.name = name

    @property
    def nfe(self) -> int:
        return self.f.nfe

    def __call__(self, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
        return self.rule(self.f, x, t0, t1)


def euler_rule(f: Field, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """x + h f(x, t0)."""
    return x + (t1 - t0) * f(x, t0)


def heun_rule(f: Field, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """Heun's (explicit trapezoidal) rule: the Euler predictor, averaged with the slope at its end."""
    h = t1 - t0
    k1 = f(x, t0)
    k2 = f(x + h * k1, t1)
    return x + (h / 2) * (k1 + k2)


def rk4_rule(f: Field, x: torch.Tensor, t0: float, t1: float) -> torch.Tensor:
    """The classical fourth-order Runge-Kutta rule."""
    h = t1 - t0
    tm = t0 + h / 2
    k1 = f(x, t0)
    k2 = f(x + (h / 2) * k1, tm)
    k3 = f(x + (h / 2) * k2, tm)
    k4 = f(x + h * k3, t1)
    return x + (h / 6) * (k1 + 2 * k2 + 2 * k3 + k4)


def euler(f: Field) -> FixedStep:
    """Euler's method on dx/dt = f(x, t) as a ``step`` for :func:`integrate` (1 NFE per step)."""
    return FixedStep(f, euler_rule, "euler")


def heun(f: Field) -> FixedStep:
    """Heun's method on dx/dt = f(x, t) as a ``step`` for :func:`integrate` (2 NFE per step)."""
    return FixedStep(f, heun_rule, "heun")


def rk4(f: Field) -> FixedStep:
    """Classical RK4 on dx/dt = f(x, t) as a ``step`` for :func:`integrate` (4 NFE per step)."""
    return FixedStep(f, rk4_rule, "rk4")


def check_tolerance(name: str, value: float) -> float:
    """A solver tolerance: a finite float > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}: expected a finite float > 0, got {value!r}")
    return float(value)


def odeint(
    f: Callable[..., Any],
    x: torch.Tensor | tuple[torch.Tensor, ...],
    times: Sequence[float] | torch.Tensor,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    adjoint: bool = False,
    *,
    return_all: bool = False,
    adjoint_params: Sequence[torch.Tensor] | None = None,
    options: dict[str, Any] | None = None,
) -> Any:
    """Solve dx/dt = f(x, t) from times[0] through times[-1] with torchdiffeq.

    ``f(x, t)`` takes the state first and ``t`` as a float, as every field here does (torchdiffeq's
    own convention is func(t, y)); only when autograd differentiates through the adaptive step
    times (backprop, not the adjoint) is ``t`` a 0-dim tensor instead, so f must do arithmetic on
    t rather than ``float(t)`` to get those gradients right. ``x`` may be a tensor or a tuple of
    tensors (then f returns a tuple). Returns the state at times[-1], or at every time stacked
    along a new first dim with ``return_all``. ``adjoint`` uses the adjoint method (memory O(1)
    in the number of steps); its parameters are ``adjoint_params``, or ``f.parameters()`` when f
    is an ``nn.Module``.
    For the NFE, pass ``counted(f)`` and read its ``nfe`` afterwards.
    """
    import torchdiffeq  # imported here: only the adaptive solver needs it

    if method not in ADAPTIVE_METHODS + FIXED_METHODS:
        raise unknown_name("ODE method", method, ADAPTIVE_METHODS + FIXED_METHODS)
    rtol = check_tolerance("odeint: rtol", rtol)
    atol = check_tolerance("odeint: atol", atol)
    ts = check_times(times, "odeint: times")
    first = x[0] if isinstance(x, tuple) else x
    if not isinstance(first, torch.Tensor):
        raise ShapeError(f"odeint: expected x to be a tensor or a tuple of tensors, got {type(first).__name__}")
    t = torch.tensor(ts, dtype=torch.float64, device=first.device)

    def func(tt: torch.Tensor, y: Any) -> Any:
        # backprop through an adaptive solver makes its step times functions of the parameters;
        # a float would cut that path and bias the gradient, so t stays a tensor exactly then
        return f(y, tt if tt.requires_grad else float(tt))

    kwargs: dict[str, Any] = {"rtol": rtol, "atol": atol, "method": method, "options": options}
    if adjoint:
        if adjoint_params is None:
            adjoint_params = tuple(f.parameters()) if isinstance(f, torch.nn.Module) else ()
        # torchdiffeq wants an nn.Module or explicit params; our wrapper holds none of its own
        out = torchdiffeq.odeint_adjoint(func, x, t, adjoint_params=tuple(adjoint_params), **kwargs)
    else:
        out = torchdiffeq.odeint(func, x, t, **kwargs)
    if return_all:
        return out
    return tuple(o[-1] for o in out) if isinstance(out, tuple) else out[-1]


def probe_noise(
    x: torch.Tensor, probes: int, distribution: str = "rademacher", generator: torch.Generator | None = None
) -> torch.Tensor:
    """``probes`` draws of v with E[v] = 0, E[v v^T] = I, shaped ``(probes, *x.shape)``."""
    if distribution not in PROBE_DISTRIBUTIONS:
        raise unknown_name("probe distribution", distribution, PROBE_DISTRIBUTIONS)
    shape = (probes, *x.shape)
    if distribution == "gaussian":
        return torch.randn(shape, generator=generator, device=x.device, dtype=x.dtype)
    return torch.randint(0, 2, shape, generator=generator, device=x.device).to(x.dtype) * 2 - 1


def divergence(
    f: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    method: str = "exact",
    probes: int = 1,
    generator: torch.Generator | None = None,
    *,
    distribution: str = "rademacher",
    noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(f(x), div f(x)) for a batch ``x`` of shape (B, ...), the divergence per sample, shape (B,).

    ``f`` must act on each sample independently (a per-sample field); bind t beforehand, e.g.
    ``divergence(lambda y: field(y, t), x)``. ``exact`` costs one vector-Jacobian product per
    dimension; ``hutchinson`` one per probe, averaging v^T (df/dx) v over ``probes`` draws of v
    (``noise`` of shape (probes, *x.shape) fixes them, e.g. one draw held over an ODE solve).
    When autograd is on at the call, the results keep their graph (to train through them);
    otherwise they are detached.
    """
    if method not in DIVERGENCE_METHODS:
        raise unknown_name("divergence method", method, DIVERGENCE_METHODS)
    if x.ndim < 2:
        raise ShapeError(f"divergence: expected x of shape (B, ...), got {tuple(x.shape)}")
    if method == "hutchinson" and noise is None:
        if isinstance(probes, bool) or not isinstance(probes, numbers.Integral) or probes < 1:
            raise ConfigError(f"divergence: probes must be an int >= 1, got {probes!r}")
    if noise is not None and (noise.ndim != x.ndim + 1 or noise.shape[1:] != x.shape):
        raise ShapeError(
            f"divergence: noise must have shape (probes, {', '.join(map(str, x.shape))}), got {tuple(noise.shape)}"
        )
    keep_graph = torch.is_grad_enabled()
    with torch.enable_grad():
        xg = x if (keep_graph and x.requires_grad) else x.detach().requires_grad_(True)
        out = f(xg)
        if out.shape != x.shape:
            raise ShapeError(f"divergence: f(x) has shape {tuple(out.shape)}, expected x's shape {tuple(x.shape)}")
        if method == "exact":
            flat = out.reshape(x.shape[0], -1)
            div = torch.zeros(x.shape[0], dtype=out.dtype, device=out.device)
            for i in range(flat.shape[1]):
                (g,) = torch.autograd.grad(flat[:, i].sum(), xg, retain_graph=True, create_graph=keep_graph)
                div = div + g.reshape(x.shape[0], -1)[:, i]
        else:
            vs = probe_noise(x, int(probes), distribution, generator) if noise is None else noise
            div = torch.zeros(x.shape[0], dtype=out.dtype, device=out.device)
            for v in vs:
                (g,) = torch.autograd.grad(out, xg, grad_outputs=v, retain_graph=True, create_graph=keep_graph)
                div = div + (g * v).reshape(x.shape[0], -1).sum(1)
            div = div / vs.shape[0]
    if not keep_graph:
        out, div = out.detach(), div.detach()
    return out, div
