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

Images (RealNVP, Dinh et al. 2017, sec. 3.4-3.6): the same coupling takes a mask of the image's
shape (C, H, W), :func:`checkerboard_mask` or :func:`channel_mask`, and a convolutional
conditioner (:func:`resnet`); :class:`Squeeze` trades each 2x2 block of pixels for 4 channels, and
:class:`MultiScale` factors out half of the channels after each scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.denoisers import ResidualBlock
from notelab.core.errors import ConfigError, ShapeError


class Bijection(nn.Module):
    """``forward(x) -> (y, ladj)`` with ladj of shape (B,), and ``inverse(y) -> x``; x of shape (B, D), or
    (B, C, H, W) for the image bijections inside a :class:`MultiScale`."""

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


class ConvNet(nn.Module):
    """RealNVP's convolutional s-t network (Dinh et al. 2017, sec. 4.1, with ReLU residual blocks).

    ``conv3x3(d_in -> hidden)``, ``depth`` time-free residual blocks (``notelab.core``'s, as
    VQ-VAE's), ReLU, ``conv3x3(hidden -> d_out)``; the last convolution starts at zero so the coupling
    starts as the identity. ``d_out = n_params * d_in`` output channels are returned as
    (B, d_in, H, W, n_params), the layout :class:`Coupling` reads its parameters in.
    """

    def __init__(self, d_in: int, d_out: int, hidden: int = 64, depth: int = 2) -> None:
        super().__init__()
        if d_out % d_in:
            raise ConfigError(f"ConvNet: expected d_out a multiple of d_in, got {d_out} and {d_in}")
        self.d_in = d_in
        self.inp = nn.Conv2d(d_in, hidden, 3, padding=1)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden, hidden) for _ in range(depth)))
        self.out = nn.Conv2d(hidden, d_out, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.out(F.relu(self.blocks(self.inp(x))))  # (B, n_params * C, H, W)
        return h.unflatten(1, (-1, self.d_in)).movedim(1, -1)


def resnet(d_in: int, d_out: int, hidden: int = 64, depth: int = 2) -> ConvNet:
    """The image coupling conditioner: a :class:`ConvNet` (``hidden`` channels, ``depth`` residual blocks)."""
    return ConvNet(d_in, d_out, hidden, depth)


def checkerboard_mask(shape: Sequence[int], parity: int) -> torch.Tensor:
    """RealNVP's spatial checkerboard (Dinh et al. 2017, fig. 3 left): ``mask[c, i, j] = 1`` where
    ``(i + j) % 2 == parity``, for every channel of ``shape`` = (C, H, W)."""
    c, h, w = shape
    i, j = torch.arange(h)[:, None], torch.arange(w)[None, :]
    return ((i + j) % 2 == parity % 2).float().expand(c, h, w).contiguous()


def channel_mask(shape: Sequence[int], parity: int) -> torch.Tensor:
    """RealNVP's channel-wise mask (fig. 3 right): 1 on the first half of the channels (``parity`` 0)
    or on the second (1), over every pixel of ``shape`` = (C, H, W)."""
    c, h, w = shape
    return half_mask(c, parity)[:, None, None].expand(c, h, w).contiguous()


class Coupling(Bijection):
    """A coupling layer: ``y = mask * x + (1 - mask) * g(x; m(mask * x))`` (module docstring).

    ``transform`` builds the elementwise law (:class:`Additive` for NICE, :class:`Affine` for
    RealNVP); ``net(d_in, d_out)`` builds the conditioner ``m`` (default :func:`mlp`), with
    ``d_in = mask.shape[0]`` and ``d_out = n_params * d_in``. ``mask`` has the shape of one sample:
    (D,) for rows, with an MLP; (C, H, W) for images, with a conv net (:func:`resnet`) whose output
    is laid out as (B, C, H, W, n_params).
    """

    def __init__(
        self,
        mask: torch.Tensor,
        transform: Callable[[], Transform] = Additive,
        net: Callable[[int, int], nn.Module] = mlp,
    ) -> None:
        super().__init__()
        mask = torch.as_tensor(mask, dtype=torch.float32)
        if mask.ndim not in (1, 3) or not ((mask == 0) | (mask == 1)).all() or mask.sum() in (0, mask.numel()):
            got = mask.tolist() if mask.numel() <= 16 else f"shape {tuple(mask.shape)}, values {mask.unique().tolist()}"
            raise ConfigError(f"Coupling: expected a 0/1 mask of shape (D,) or (C, H, W) with both values, got {got}")
        self.register_buffer("mask", mask)
        self.transform = transform()
        self.net = net(mask.shape[0], mask.shape[0] * self.transform.n_params)

    def _params(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * self.mask).reshape(*x.shape, self.transform.n_params)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y, ladj = self.transform.forward(x, self._params(x))
        keep = self.mask
        return keep * x + (1 - keep) * y, ((1 - keep) * ladj).flatten(1).sum(dim=1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        # y_a = x_a, so the conditioner sees the same input as in forward.
        x = self.transform.inverse(y, self._params(y))
        return self.mask * y + (1 - self.mask) * x


class Squeeze(Bijection):
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2x2 block of pixels becomes 4 channels (RealNVP sec. 3.6).

    A permutation of the coordinates, so ``log|det| = 0``; it lets the channel-wise couplings that
    follow mix neighbouring pixels.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return F.pixel_unshuffle(x, 2), x.new_zeros(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(y, 2)


class MultiScale(Bijection):
    """RealNVP's multi-scale architecture (Dinh et al. 2017, sec. 3.6, eq. 15-16) on flat rows (B, D).

    The rows are images of ``shape`` = (C, H, W). Each of ``scales`` (a bijection that ends with a
    :class:`Squeeze`, e.g. 3 checkerboard couplings, squeeze, 3 channel-wise couplings) is applied,
    then the first half of the channels is factored out as part of ``z`` and only the rest goes on
    to the next scale; ``final`` transforms what is left::

        h^(0) = x,   (z^(i), h^(i)) = split(scale_i(h^(i-1))),   z^(L) = final(h^(L-1)),
        y = concat(z^(1), ..., z^(L)) flattened,   log|det| = sum of the parts' log|det|.

    Factoring out halves the cost of each deeper scale and gives latents at several resolutions.
    """

    def __init__(self, shape: Sequence[int], scales: Sequence[Bijection], final: Bijection) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        self.scales = nn.ModuleList(scales)
        self.final = final
        c, h, w = self.shape
        self.kept: list[tuple[int, int, int]] = []  # the shape each scale passes on (= the shape it factors out)
        for _ in scales:
            c, h, w = 2 * c, h // 2, w // 2  # squeezed to 4C channels, half of them factored out
            self.kept.append((c, h, w))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = x.reshape(x.shape[0], *self.shape)
        zs, ladj = [], x.new_zeros(x.shape[0])
        for scale in self.scales:
            h, step = scale(h)
            ladj = ladj + step
            z, h = h.chunk(2, dim=1)
            zs.append(z.flatten(1))
        h, step = self.final(h)
        zs.append(h.flatten(1))
        return torch.cat(zs, dim=1), ladj + step

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        sizes = [math.prod(s) for s in self.kept] + [math.prod(self.kept[-1]) if self.kept else y.shape[1]]
        parts = y.split(sizes, dim=1)
        last = self.kept[-1] if self.kept else self.shape
        h = self.final.inverse(parts[-1].reshape(y.shape[0], *last))
        for scale, z, shape in zip(reversed(self.scales), reversed(parts[:-1]), reversed(self.kept)):
            h = scale.inverse(torch.cat([z.reshape(y.shape[0], *shape), h], dim=1))
        return h.flatten(1)


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
    unit variance, then trained as ordinary parameters. ``shape`` is that of ``b`` and ``s``: ``D``
    (one pair per coordinate of rows (B, D)) or e.g. ``(C, 1, 1)`` for images (B, C, H, W), one pair
    per channel shared by every pixel (Glow's), the statistics then taken over the batch and the
    pixels. ``log|det| = sum of s over every coordinate of x`` (H W sum_c s_c per channel).

    A coordinate that barely varies in that batch (a pixel blank in every image of it) would get
    a scale of thousands, and a test image with ink there a log-density of minus millions; so the
    spread used is floored at ``min_spread`` times the mean spread.
    """

    def __init__(self, shape: int | Sequence[int], min_spread: float = 0.1) -> None:
        super().__init__()
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        self.bias = nn.Parameter(torch.zeros(shape))
        self.log_scale = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))
        self.min_spread = min_spread

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and not bool(self.initialized) and x.shape[0] > 1:
            # statistics over the batch and over every axis the parameters are shared along
            dims = [0] + [i + 1 for i, n in enumerate(self.bias.shape) if n == 1 and x.shape[i + 1] != 1]
            with torch.no_grad():
                self.bias.copy_(x.mean(dims, keepdim=True)[0])
                std = x.std(dims, keepdim=True)[0]
                self.log_scale.copy_(-std.clamp_min(self.min_spread * float(std.mean()) + 1e-12).log())
                self.initialized.fill_(True)
        ladj = self.log_scale.expand(x.shape[1:]).sum()
        return (x - self.bias) * self.log_scale.exp(), ladj.expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y * (-self.log_scale).exp() + self.bias


def check_rows(x: torch.Tensor, dim: int, who: str) -> None:
    """A batch of ``dim``-vectors, finite: one-line :class:`ShapeError` otherwise."""
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.shape[1] != dim:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ShapeError(f"{who}: expected a tensor of shape (B, {dim}), got {shape}")
    if not bool(torch.isfinite(x).all()):
        raise ShapeError(f"{who}: expected finite values, got {int((~torch.isfinite(x)).sum())} NaN/inf")
