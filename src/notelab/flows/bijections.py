"""Bijections with a tractable log-determinant: the pieces of a discrete normalizing flow.

A bijection ``f`` maps ``x`` (B, D) to ``y`` (B, D) and returns, with ``y``, the log of the
absolute Jacobian determinant of each row::

    y, log|det df/dx| = f(x)          x = f.inverse(y)

so that, for ``z = f(x)`` with base density ``p_Z``, the change of variables gives
``log p_X(x) = log p_Z(f(x)) + log|det df/dx|`` (Dinh et al. 2015, NICE, eq. 1). The interface
follows zuko's transforms (a forward with its ladj, an inverse); compositions add ladjs.

Coupling layer (NICE, eq. 4-5; RealNVP, Dinh et al. 2017, eq. 6-7): a binary ``mask`` splits x
into a conditioning part ``x_a = mask * x`` that passes through unchanged and a part
``x_b`` transformed elementwise by parameters computed from ``x_a``::

    y_a = x_a,      y_b = g(x_b; m(x_a)),      log|det| = sum_b log|g'(x_b)|

The Jacobian is triangular, so its determinant is the product of the diagonal. The elementwise
map ``g`` is injected (:class:`Additive`: ``g = x + t``, log-det 0, NICE; :class:`Affine`:
``g = x exp(s) + t``, log-det ``sum s``, RealNVP): NICE and RealNVP are the same coupling flow
with a different transform.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from notelab.core.errors import ConfigError, ShapeError


class Bijection(nn.Module):
    """``forward(x) -> (y, ladj)`` with ladj of shape (B,), and ``inverse(y) -> x``; rows of shape (B, D)."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Compose(Bijection):
    """``f_K o ... o f_1``: forward applies the bijections in order and adds their ladjs (chain rule)."""

    def __init__(self, bijections: Sequence[Bijection]) -> None:
        super().__init__()
        self.bijections = nn.ModuleList(bijections)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ladj = x.new_zeros(x.shape[0])
        for f in self.bijections:
            x, step = f(x)
            ladj = ladj + step
        return x, ladj

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        for f in reversed(self.bijections):
            y = f.inverse(y)
        return y


class Permutation(Bijection):
    """``y = x[:, perm]``: a fixed permutation of the coordinates (|det| = 1, ladj 0)."""

    def __init__(self, perm: torch.Tensor) -> None:
        super().__init__()
        perm = torch.as_tensor(perm, dtype=torch.long)
        if perm.ndim != 1 or not torch.equal(perm.sort().values, torch.arange(len(perm))):
            raise ConfigError(f"Permutation: expected a permutation of 0..D-1, got {perm.tolist()}")
        self.register_buffer("perm", perm)
        self.register_buffer("inv", torch.argsort(perm))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x[:, self.perm], x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, self.inv]


def reverse(dim: int) -> Permutation:
    """The permutation that reverses the coordinates (Glow's and RealNVP's channel reversal)."""
    return Permutation(torch.arange(dim - 1, -1, -1))


def random_permutation(dim: int, seed: int = 0) -> Permutation:
    """A random permutation, fixed by ``seed`` (stored as a buffer, so saved with the model)."""
    return Permutation(torch.randperm(dim, generator=torch.Generator().manual_seed(seed)))


def alternating_mask(dim: int, parity: int) -> torch.Tensor:
    """``mask[i] = 1`` where ``i % 2 == parity``: NICE's partition into odd and even coordinates.

    On a flattened image of even width this is RealNVP's column-wise stripes; alternating
    ``parity`` between layers lets every coordinate be transformed.
    """
    return (torch.arange(dim) % 2 == parity % 2).float()


def half_mask(dim: int, parity: int) -> torch.Tensor:
    """``mask = 1`` on the first half of the coordinates (``parity`` 0) or on the second (1)."""
    first = torch.arange(dim) < (dim + 1) // 2
    return (first if parity % 2 == 0 else ~first).float()


# ------------------------------------------------------------------------------- elementwise maps


class Transform:
    """An elementwise map ``g(x; params)`` with ``n_params`` parameters per coordinate.

    ``forward(x, params) -> (y, log|g'(x)|)`` (both shaped like x) and ``inverse(y, params) -> x``,
    ``params`` of shape (B, D, n_params).
    """

    n_params: int = 1

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Additive(Transform):
    """NICE's additive coupling law ``g(x; t) = x + t`` (Dinh et al. 2015, eq. 5): unit Jacobian."""

    n_params = 1

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x + params[..., 0], torch.zeros_like(x)

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return y - params[..., 0]


def soft_clamp(s: torch.Tensor, bound: float) -> torch.Tensor:
    """``bound * tanh(s / bound)``: the identity near 0, smoothly limited to (-bound, bound).

    Bounding the log-scale keeps ``exp(s)`` from overflowing early in training (the stabilised
    scale of RealNVP's tanh and Glow / FrEIA's soft clamp).
    """
    return bound * torch.tanh(s / bound)


class Affine(Transform):
    """RealNVP's affine coupling law ``g(x; s, t) = x exp(s) + t`` (Dinh et al. 2017, eq. 7), ``log|g'| = s``.

    ``s`` is the conditioner's raw output through :func:`soft_clamp` with ``clamp``.
    """

    n_params = 2

    def __init__(self, clamp: float = 3.0) -> None:
        if not clamp > 0:
            raise ConfigError(f"Affine: expected clamp > 0, got {clamp}")
        self.clamp = clamp

    def forward(self, x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = soft_clamp(params[..., 0], self.clamp)
        return x * s.exp() + params[..., 1], s

    def inverse(self, y: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        s = soft_clamp(params[..., 0], self.clamp)
        return (y - params[..., 1]) * (-s).exp()


def mlp(d_in: int, d_out: int, hidden: int = 128, depth: int = 3) -> nn.Sequential:
    """The coupling conditioner ``m``: ``depth`` hidden ReLU layers of width ``hidden``.

    The last layer starts at zero, so every coupling starts as the identity (as Glow does): a deep
    flow then begins at the base density instead of a random, badly scaled map.
    """
    layers: list[nn.Module] = []
    width = d_in
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    last = nn.Linear(width, d_out)
    nn.init.zeros_(last.weight)
    nn.init.zeros_(last.bias)
    return nn.Sequential(*layers, last)


class Coupling(Bijection):
    """A coupling layer: ``y = mask * x + (1 - mask) * g(x; m(mask * x))`` (module docstring).

    ``transform`` builds the elementwise law (:class:`Additive` for NICE, :class:`Affine` for
    RealNVP); ``net(d_in, d_out)`` builds the conditioner ``m`` (default :func:`mlp`).
    """

    def __init__(
        self,
        mask: torch.Tensor,
        transform: Callable[[], Transform] = Additive,
        net: Callable[[int, int], nn.Module] = mlp,
    ) -> None:
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.ndim != 1 or not ((mask == 0) | (mask == 1)).all() or mask.sum() in (0, len(mask)):
            raise ConfigError(f"Coupling: expected a 1-D 0/1 mask with both values, got {mask.tolist()}")
        self.register_buffer("mask", mask)
        self.transform = transform()
        self.net = net(len(mask), len(mask) * self.transform.n_params)

    def _params(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.mask).view(x.shape[0], x.shape[1], self.transform.n_params)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, ladj = self.transform.forward(x, self._params(x))
        keep = self.mask
        return keep * x + (1 - keep) * y, ((1 - keep) * ladj).sum(dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        # y_a = x_a, so the conditioner sees the same input as in forward.
        x = self.transform.inverse(y, self._params(y))
        return self.mask * y + (1 - self.mask) * x


class DiagonalScaling(Bijection):
    """NICE's scaling layer ``y = x * exp(s)`` (Dinh et al. 2015, sec. 3.3): ``log|det| = sum_i s_i``.

    Volume-preserving couplings cannot change the density's scale; this last layer can, and the
    learned ``s_i`` say how much each dimension matters.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * (-self.log_scale).exp()


class ActNorm(Bijection):
    """Glow's activation normalisation ``y = (x - b) * exp(s)`` (Kingma & Dhariwal 2018, sec. 3.1).

    ``b`` and ``s`` are set from the first batch seen in training so that ``y`` has zero mean and
    unit variance per coordinate, then trained as ordinary parameters. ``log|det| = sum_i s_i``.

    A coordinate that barely varies in that batch (a pixel blank in every image of it) would get
    a scale of thousands, and a test image with ink there a log-density of minus millions; so the
    spread used is floored at ``min_spread`` times the coordinates' mean spread.
    """

    def __init__(self, dim: int, min_spread: float = 0.1) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(dim))
        self.log_scale = nn.Parameter(torch.zeros(dim))
        self.register_buffer("initialized", torch.tensor(False))
        self.min_spread = min_spread

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized) and x.shape[0] > 1:
            with torch.no_grad():
                self.bias.copy_(x.mean(0))
                std = x.std(0)
                self.log_scale.copy_(-std.clamp_min(self.min_spread * float(std.mean()) + 1e-12).log())
                self.initialized.fill_(True)
        return (x - self.bias) * self.log_scale.exp(), self.log_scale.sum().expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * (-self.log_scale).exp() + self.bias


def check_rows(x: torch.Tensor, dim: int, who: str) -> None:
    """A batch of ``dim``-vectors, finite: one-line :class:`ShapeError` otherwise."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(f"{who}: expected a tensor of shape (B, {dim}), got {shape}")
    if not bool(torch.isfinite(x).all()):
        raise ShapeError(f"{who}: expected finite values, got {int((~torch.isfinite(x)).sum())} NaN/inf")
