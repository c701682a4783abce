"""Toy 2-D densities with a sampler and, where one exists in closed form or by quadrature, a log-density.

Each density ``p`` is a :class:`ToyDensity` with ``sample(n, generator) -> (n, 2)`` and
``log_prob(x) -> (n,)``; the data live roughly in ``[-4, 4]^2`` with per-coordinate spread near 1-2,
so diffusion and flow models can use them without rescaling.

- ``8gaussians``: an equal mixture of 8 isotropic Gaussians on a circle (exact log-density)::

      p(x) = 1/8 sum_k N(x; R (cos 2 pi k / 8, sin 2 pi k / 8), s^2 I)

- ``checkerboard``: uniform on the black squares of a board of ``cells x cells`` squares of side
  ``size`` (exact log-density: ``-log(black area)`` on a black square, ``-inf`` elsewhere).
- ``rings``: concentric circles of radii ``R_k`` with mixture weights ``w_k``; a sample draws a ring,
  an angle ``theta ~ U[0, 2 pi)`` and a radius ``r = |R_k + s eps|``. Changing variables from polar
  coordinates (Jacobian ``r``) gives the exact density::

      p(x) = sum_k w_k [N(r; R_k, s^2) + N(-r; R_k, s^2)] / (2 pi r),   r = |x|

  (the second term accounts for the fold at ``r = 0`` and is negligible for the default radii).
- ``moons`` and ``swissroll``: a curve ``c(t)`` with ``t ~ U[t0, t1]`` plus Gaussian noise,
  ``x = c(t) + s eps``. The density is the noise Gaussian convolved with the law of ``c(t)``::

      p(x) = 1 / (t1 - t0) int_{t0}^{t1} N(x; c(t), s^2 I) dt  ~=  sum_k w_k N(x; c(t_k), s^2 I)

  by composite Simpson's rule (weights ``w_k``) on 1,000 intervals per curve. Its error is
  O(h^4): against a 16,000-interval reference the log-density of 20,000 samples is off by at
  most 4e-7 (moons) and 6e-6 (swiss roll). (The midpoint rule converges only as O(h^2), because
  the curves have ends: 2,000 nodes still left errors of 1e-3.) The two moons are scikit-learn's
  ``make_moons`` arcs (centred), the swiss roll its ``make_swiss_roll`` spiral (as in FFJORD,
  Grathwohl et al. 2019), both with ``t`` uniform as scikit-learn draws it.

Defaults: 8 Gaussians at radius 2 with std 0.2; a 4x4 board of unit squares on ``[-2, 2]^2``;
rings of radii 0.5, 1, 1.5, 2 with radial std 0.08 and weights proportional to the radius (equal
mass per unit of arc); moons (scaled by 2) and swiss roll (scaled by 1/5) with noise std 0.2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from notelab.core.errors import ConfigError, ShapeError, unknown_name

LOG_2PI = math.log(2 * math.pi)
# Rows of x per chunk when a log-density evaluates every (point, node) pair: bounds memory at
# about chunk * nodes * 8 bytes.
_CHUNK = 4096


def _check_points(x: torch.Tensor, who: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.ndim != 2 or x.shape[1] != 2:
        raise ShapeError(f"{who}.log_prob: expected points of shape (n, 2), got {tuple(x.shape)}")
    return x


def _isotropic_log_normal(x: torch.Tensor, centres: torch.Tensor, std: float) -> torch.Tensor:
    """``log N(x_i; c_k, std^2 I)`` for every pair, shape ``(n, K)``, 2-D points."""
    # |x - c|^2 expanded so that the (n, K) block is one matmul; float64 keeps the cancellation harmless.
    d2 = (x.pow(2).sum(1, keepdim=True) + centres.pow(2).sum(1) - 2 * x @ centres.T).clamp_min(0)
    return -0.5 * d2 / std**2 - 2 * math.log(std) - LOG_2PI


def _mixture_log_prob(x: torch.Tensor, centres: torch.Tensor, std: float, log_weights: torch.Tensor) -> torch.Tensor:
    """``log sum_k w_k N(x; c_k, std^2 I)`` in float64, chunked over the rows of ``x``."""
    x64 = x.to(torch.float64)
    c64 = centres.to(x.device, torch.float64)
    log_weights = log_weights.to(x.device)
    out = [torch.logsumexp(_isotropic_log_normal(xc, c64, std) + log_weights, dim=1) for xc in x64.split(_CHUNK)]
    return torch.cat(out) if out else x64.new_zeros(0)


class ToyDensity:
    """A 2-D distribution: ``sample(n, generator)`` and, when ``has_log_prob``, ``log_prob(x)``."""

    name: str = "toy"
    has_log_prob: bool = True

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` points of shape ``(n, 2)``, float32, drawn with ``generator``."""
        raise NotImplementedError

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Log-density of each row of ``x`` (shape ``(n, 2)``), returned as ``(n,)`` in ``x``'s dtype."""
        raise ConfigError(f"toy density {self.name!r} has no known log-density (has_log_prob=False)")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def _check_n(n: int) -> None:
    if not isinstance(n, int) or n < 0:
        raise ConfigError(f"sample: expected a number of points n >= 0, got {n!r}")


def _out_dtype(x: torch.Tensor) -> torch.dtype:
    return x.dtype if x.is_floating_point() else torch.float32


@dataclass
class GaussianMixture2D(ToyDensity):
    """Equal mixture of ``k`` isotropic Gaussians with std ``std`` on a circle of radius ``radius``."""

    k: int = 8
    radius: float = 2.0
    std: float = 0.2
    name: str = "8gaussians"

    @property
    def centres(self) -> torch.Tensor:
        angle = torch.arange(self.k, dtype=torch.float64) * (2 * math.pi / self.k)
        return self.radius * torch.stack([angle.cos(), angle.sin()], dim=1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_n(n)
        which = torch.randint(0, self.k, (n,), generator=generator)
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (self.centres[which] + self.std * eps).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_points(x, self.name)
        log_w = torch.full((self.k,), -math.log(self.k), dtype=torch.float64)
        return _mixture_log_prob(x, self.centres, self.std, log_w).to(_out_dtype(x))


@dataclass
class Checkerboard(ToyDensity):
    """Uniform on the black squares of a ``cells x cells`` board of squares of side ``size``, centred at 0.

    The square ``(i, j)`` (counted from the lower left) is black when ``i + j`` is even.
    """

    cells: int = 4
    size: float = 1.0
    name: str = "checkerboard"

    @property
    def half(self) -> float:
        return self.cells * self.size / 2

    @property
    def n_black(self) -> int:
        return (self.cells * self.cells + 1) // 2

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_n(n)
        # Enumerate black squares, pick one uniformly (all have equal area), then a uniform point in it.
        ij = torch.tensor([(i, j) for i in range(self.cells) for j in range(self.cells) if (i + j) % 2 == 0])
        pick = ij[torch.randint(0, len(ij), (n,), generator=generator)].to(torch.float64)
        u = torch.rand(n, 2, generator=generator, dtype=torch.float64)
        return ((pick + u) * self.size - self.half).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_points(x, self.name)
        cell = torch.floor((x.to(torch.float64) + self.half) / self.size)
        inside = ((cell >= 0) & (cell < self.cells)).all(dim=1)
        black = inside & (cell.sum(dim=1).remainder(2) == 0)
        log_area = math.log(self.n_black * self.size**2)
        out = torch.where(black, torch.tensor(-log_area, dtype=torch.float64), torch.tensor(-math.inf))
        return out.to(_out_dtype(x))


@dataclass
class Rings(ToyDensity):
    """Concentric rings of radii ``radii``, radial Gaussian noise ``std``, ring weights proportional to radius.

    Weights proportional to radius make the density along every ring equal (equal mass per arc length).
    """

    radii: tuple[float, ...] = (0.5, 1.0, 1.5, 2.0)
    std: float = 0.08
    name: str = "rings"

    @property
    def weights(self) -> torch.Tensor:
        r = torch.tensor(self.radii, dtype=torch.float64)
        return r / r.sum()

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_n(n)
        which = torch.multinomial(self.weights, n, replacement=True, generator=generator) if n else torch.zeros(0)
        radius = torch.tensor(self.radii, dtype=torch.float64)[which.long()]
        r = (radius + self.std * torch.randn(n, generator=generator, dtype=torch.float64)).abs()
        theta = 2 * math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
        return torch.stack([r * theta.cos(), r * theta.sin()], dim=1).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_points(x, self.name)
        r = x.to(torch.float64).norm(dim=1, keepdim=True)  # (n, 1)
        radius = torch.tensor(self.radii, dtype=torch.float64, device=x.device)  # (K,)
        log_norm = -math.log(self.std) - 0.5 * LOG_2PI
        near = -0.5 * ((r - radius) / self.std) ** 2 + log_norm
        folded = -0.5 * ((r + radius) / self.std) ** 2 + log_norm
        radial = torch.logaddexp(near, folded) + self.weights.log().to(x.device)
        return (torch.logsumexp(radial, dim=1) - math.log(2 * math.pi) - r[:, 0].log()).to(_out_dtype(x))


def simpson_weights(intervals: int) -> torch.Tensor:
    """Composite Simpson weights on ``intervals + 1`` equispaced nodes of ``[0, 1]`` (``intervals`` even)."""
    if intervals < 2 or intervals % 2:
        raise ConfigError(f"Simpson's rule: expected an even number of intervals >= 2, got {intervals}")
    w = torch.ones(intervals + 1, dtype=torch.float64)
    w[1:-1:2] = 4
    w[2:-1:2] = 2
    return w / (3 * intervals)


@dataclass
class NoisyCurve(ToyDensity):
    """``x = c_j(t) + std * eps`` with a curve ``c_j`` picked uniformly from ``curves`` and ``t ~ U[t0, t1]``.

    ``log_prob`` integrates over ``t`` by composite Simpson's rule on ``intervals`` intervals per curve;
    several curves (the two moons) are separate pieces so that no quadrature panel straddles a jump.
    """

    curves: tuple[Callable[[torch.Tensor], torch.Tensor], ...] = field(repr=False)  # each: (K,) t -> (K, 2)
    t0: float = 0.0
    t1: float = 1.0
    std: float = 0.1
    intervals: int = 1000
    name: str = "curve"

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        _check_n(n)
        which = torch.randint(0, len(self.curves), (n,), generator=generator)
        t = self.t0 + (self.t1 - self.t0) * torch.rand(n, generator=generator, dtype=torch.float64)
        on_curve = torch.stack([c(t) for c in self.curves])[which, torch.arange(n)]
        eps = torch.randn(n, 2, generator=generator, dtype=torch.float64)
        return (on_curve + self.std * eps).float()

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        x = _check_points(x, self.name)
        t = torch.linspace(self.t0, self.t1, self.intervals + 1, dtype=torch.float64)
        nodes = torch.cat([c(t) for c in self.curves])
        log_w = (simpson_weights(self.intervals) / len(self.curves)).log().repeat(len(self.curves))
        return _mixture_log_prob(x, nodes, self.std, log_w).to(_out_dtype(x))


def _upper_moon(t: torch.Tensor) -> torch.Tensor:
    return 2 * torch.stack([t.cos() - 0.5, t.sin() - 0.25], dim=1)


def _lower_moon(t: torch.Tensor) -> torch.Tensor:
    return 2 * torch.stack([0.5 - t.cos(), 0.25 - t.sin()], dim=1)


def _swissroll_curve(t: torch.Tensor) -> torch.Tensor:
    return 0.2 * torch.stack([t * t.cos(), t * t.sin()], dim=1)


def moons(std: float = 0.2) -> NoisyCurve:
    """Two interleaving half circles: scikit-learn's ``make_moons`` (noise 0.1) centred and scaled by 2."""
    return NoisyCurve(curves=(_upper_moon, _lower_moon), t0=0.0, t1=math.pi, std=std, name="moons")


def swissroll(std: float = 0.2) -> NoisyCurve:
    """scikit-learn's ``make_swiss_roll`` spiral ``(t cos t, t sin t)``, ``t in [1.5 pi, 4.5 pi]``, scaled by 1/5.

    ``t`` is uniform, as in scikit-learn, so the outer turns hold as much mass as the inner ones.
    """
    return NoisyCurve(curves=(_swissroll_curve,), t0=1.5 * math.pi, t1=4.5 * math.pi, std=std, name="swissroll")


TOY_DENSITIES: dict[str, Callable[[], ToyDensity]] = {
    "8gaussians": GaussianMixture2D,
    "checkerboard": Checkerboard,
    "moons": moons,
    "rings": Rings,
    "swissroll": swissroll,
}


def toy_density(name: str) -> ToyDensity:
    """The toy density called ``name`` (one of :data:`TOY_DENSITIES`)."""
    if name not in TOY_DENSITIES:
        raise unknown_name("toy density", name, TOY_DENSITIES)
    return TOY_DENSITIES[name]()
