"""Discrete normalizing flows: ``Flow`` = base density + bijection, and the coupling flows NICE / RealNVP.

The flow's bijection ``f`` maps data to latents (NICE's encoder direction), so::

    log p(x) = log p_Z(f(x)) + log|det df/dx|          (exact, by the change of variables)
    x = f^{-1}(z),  z ~ p_Z                              (sampling: the decoder comes for free)

:class:`CouplingFlow` stacks ``n_couplings`` coupling layers with alternating masks, each
optionally preceded by ActNorm, and ends with NICE's diagonal scaling layer. NICE (Dinh et al.
2015): additive couplings, logistic prior, scaling layer. RealNVP (Dinh et al. 2017): affine
couplings, Gaussian prior. The two presets differ only in the names of injected pieces.

With ``arch="multiscale"`` on images (C, H, W) the couplings are RealNVP's convolutional ones
(Dinh et al. 2017, sec. 3.6): per scale, 3 checkerboard couplings, a squeeze, 3 channel-wise
couplings, then half of the channels factored out; 4 checkerboard couplings on what is left after
``n_scales`` scales. The same :class:`~notelab.flows.bijections.Coupling`, with an image mask and a
conv conditioner injected.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from notelab.core.checkpoint import PretrainedMixin
from notelab.core.errors import ConfigError, ShapeError, unknown_name
from notelab.flows.bijections import (
    ActNorm,
    Additive,
    Affine,
    Bijection,
    Compose,
    Coupling,
    DiagonalScaling,
    MultiScale,
    Squeeze,
    alternating_mask,
    channel_mask,
    check_rows,
    checkerboard_mask,
    half_mask,
    mlp,
    resnet,
)
from notelab.flows.priors import PRIORS

TRANSFORMS = {"additive": Additive, "affine": Affine}
MASKS = {"alternate": alternating_mask, "half": half_mask}
NORMS = ("none", "actnorm")
ARCHS = ("mlp", "multiscale")
# RealNVP's layout (Dinh et al. 2017, sec. 4.1): couplings per group of a scale, and at the last scale.
SCALE_COUPLINGS, FINAL_COUPLINGS = 3, 4


def check_n(n: int) -> None:
    """A number of samples ``n >= 1``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ConfigError(f"sample: expected a number of samples n >= 1, got {n!r}")


class Flow(nn.Module):
    """A normalizing flow on rows of shape ``sample_shape`` (flattened to ``D``): ``base`` + ``bijection``."""

    def __init__(self, bijection: Bijection, base: nn.Module, sample_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.bijection = bijection
        self.base = base
        self.sample_shape = tuple(sample_shape)
        self.dim = math.prod(self.sample_shape)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of shape ``sample_shape`` (or already flat ``(D,)``) as (B, D), checked finite."""
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or tuple(x.shape[1:]) not in (self.sample_shape, (self.dim,)):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ShapeError(f"Flow: expected x of shape (B, {', '.join(map(str, self.sample_shape))}), got {shape}")
        x = x.reshape(x.shape[0], self.dim)
        check_rows(x, self.dim, "Flow")
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)``: the call ``fit`` makes through a DDP / compile wrapper."""
        return self.log_prob(x)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log p(x)`` of each row, shape (B,), nats."""
        z, ladj = self.bijection(self._flat(x))
        return self.base.log_prob(z) + ladj

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` samples ``f^{-1}(z)``, ``z ~ p_Z``, shaped ``(n, *sample_shape)``."""
        check_n(n)
        z = self.base.sample(n, generator=generator, device=self.device).to(self.dtype)
        return self.bijection.inverse(z).reshape(n, *self.sample_shape)

    def rsample_and_log_prob(
        self, n: int, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Differentiable samples and their log-density ``log p(x) = log p_Z(z) + log|det df/dx|``, ``x = f^{-1}(z)``.

        The ladj at ``x = f^{-1}(z)`` is taken from one forward pass of ``x`` (the bijections give
        the forward ladj only).
        """
        check_n(n)
        z = self.base.sample(n, generator=generator, device=self.device).to(self.dtype)
        x = self.bijection.inverse(z)
        _, ladj = self.bijection(x)
        return x.reshape(n, *self.sample_shape), self.base.log_prob(z) + ladj

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.parameters())).dtype


@dataclass
class CouplingFlowConfig:
    sample_shape: tuple[int, ...] = (2,)  # one sample, e.g. (2,) for points or (1, 8, 8) for digits
    transform: str = "additive"  # "additive" (NICE) or "affine" (RealNVP): the coupling law
    prior: str = "logistic"  # "logistic" (NICE) or "gaussian" (RealNVP)
    n_couplings: int = 4  # coupling layers (NICE: 4)
    hidden: int = 128  # width of each conditioner MLP
    depth: int = 3  # hidden layers per conditioner (NICE: 5 of 1000 units on MNIST)
    mask: str = "alternate"  # "alternate" (odd / even coordinates) or "half" (first / second half)
    norm: str = "none"  # "none" or "actnorm" before each coupling
    scaling: bool = True  # NICE's diagonal scaling layer at the end
    clamp: float = 3.0  # soft bound on the affine log-scale
    arch: str = "mlp"  # "mlp" (couplings of the flattened vector) or "multiscale" (RealNVP's conv couplings)
    n_scales: int = 2  # multiscale: scales (squeeze + factor-out) before the last couplings

    def __post_init__(self) -> None:
        self.sample_shape = tuple(int(s) for s in self.sample_shape)
        if not self.sample_shape or any(s < 1 for s in self.sample_shape) or math.prod(self.sample_shape) < 2:
            raise ConfigError(
                f"CouplingFlowConfig.sample_shape: expected 2 or more dimensions, got {self.sample_shape}"
            )
        for name, table in (("transform", TRANSFORMS), ("prior", PRIORS), ("mask", MASKS)):
            if getattr(self, name) not in table:
                raise unknown_name(name, getattr(self, name), table)
        if self.norm not in NORMS:
            raise unknown_name("norm", self.norm, NORMS)
        for name in ("n_couplings", "hidden", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"CouplingFlowConfig.{name}: expected an integer >= 1, got {value!r}")
        if not self.clamp > 0:
            raise ConfigError(f"CouplingFlowConfig.clamp: expected > 0, got {self.clamp}")
        if self.arch not in ARCHS:
            raise unknown_name("arch", self.arch, ARCHS)
        if isinstance(self.n_scales, bool) or not isinstance(self.n_scales, int) or self.n_scales < 0:
            raise ConfigError(f"CouplingFlowConfig.n_scales: expected an integer >= 0, got {self.n_scales!r}")
        if self.arch == "multiscale":
            check_multiscale_shape(self.sample_shape, self.n_scales)

    @property
    def dim(self) -> int:
        return math.prod(self.sample_shape)

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> CouplingFlowConfig:
        """A preset (``PRESETS``: ``nice``, ``realnvp``) with fields replaced by ``overrides``."""
        if name not in PRESETS:
            raise unknown_name("coupling flow preset", name, PRESETS)
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            raise ConfigError(f"CouplingFlowConfig.from_name: unknown field(s) {', '.join(bad)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict[str, Any]] = {
    "nice": dict(transform="additive", prior="logistic", n_couplings=4, scaling=True, norm="none"),
    "realnvp": dict(transform="affine", prior="gaussian", n_couplings=6, scaling=True, norm="actnorm"),
}


def check_multiscale_shape(shape: tuple[int, ...], n_scales: int) -> None:
    """Images (C, H, W) whose H and W halve ``n_scales`` times (each scale squeezes 2x2 pixels)."""
    div = 2**n_scales
    if len(shape) != 3 or shape[1] % div or shape[2] % div:
        raise ConfigError(
            f"CouplingFlowConfig: arch 'multiscale' expects images (C, H, W) with H and W divisible by "
            f"2**n_scales = {div}, got sample_shape {shape}"
        )


def multiscale_layout(shape: tuple[int, ...], n_scales: int) -> list[tuple[str, int, tuple[int, int, int]]]:
    """The layers of RealNVP's multi-scale flow in order: ("checkerboard" | "channel", parity, image shape),
    ("squeeze", 0, shape) and ("split", 0, shape before the split) (module docstring)."""
    c, h, w = shape
    layers: list[tuple[str, int, tuple[int, int, int]]] = []
    for _ in range(n_scales):
        layers += [("checkerboard", k, (c, h, w)) for k in range(SCALE_COUPLINGS)]
        layers.append(("squeeze", 0, (c, h, w)))
        c, h, w = 4 * c, h // 2, w // 2
        layers += [("channel", k, (c, h, w)) for k in range(SCALE_COUPLINGS)]
        layers.append(("split", 0, (c, h, w)))
        c //= 2
    layers += [("checkerboard", k, (c, h, w)) for k in range(FINAL_COUPLINGS)]
    return layers


def build_multiscale(config: CouplingFlowConfig, transform: Any) -> MultiScale:
    """:class:`MultiScale` from :func:`multiscale_layout`: each scale a ``Compose`` up to its split."""
    net = partial(resnet, hidden=config.hidden, depth=config.depth)
    masks = {"checkerboard": checkerboard_mask, "channel": channel_mask}
    scales, layers = [], []
    for kind, parity, shape in multiscale_layout(config.sample_shape, config.n_scales):
        if kind == "split":
            scales.append(Compose(layers))
            layers = []
        elif kind == "squeeze":
            layers.append(Squeeze())
        else:
            if config.norm == "actnorm":
                layers.append(ActNorm((shape[0], 1, 1)))  # per channel, as Glow: pixels share statistics
            layers.append(Coupling(masks[kind](shape, parity), transform=transform, net=net))
    return MultiScale(config.sample_shape, scales, Compose(layers))


def build_bijection(config: CouplingFlowConfig) -> Compose:
    """The layers of a :class:`CouplingFlow`: [ActNorm], Coupling with mask parity k % 2, ..., [scaling]
    (or the multi-scale flow, then [scaling])."""
    d = config.dim
    transform = partial(Affine, clamp=config.clamp) if config.transform == "affine" else TRANSFORMS[config.transform]
    layers: list[Bijection] = []
    if config.arch == "multiscale":
        layers.append(build_multiscale(config, transform))
    else:
        net = partial(mlp, hidden=config.hidden, depth=config.depth)
        for k in range(config.n_couplings):
            if config.norm == "actnorm":
                layers.append(ActNorm(d))
            layers.append(Coupling(MASKS[config.mask](d, k), transform=transform, net=net))
    if config.scaling:
        layers.append(DiagonalScaling(d))
    return Compose(layers)


class CouplingFlow(PretrainedMixin, Flow):
    """NICE / RealNVP from a :class:`CouplingFlowConfig`; ``save_pretrained`` / ``from_pretrained``."""

    config_class = CouplingFlowConfig
    model_type = "coupling_flow"

    def __init__(self, config: CouplingFlowConfig) -> None:
        super().__init__(build_bijection(config), PRIORS[config.prior](config.dim), config.sample_shape)
        self.config = config

    @classmethod
    def num_parameters(cls, config: CouplingFlowConfig) -> int:
        """The exact parameter count (what ``from_pretrained`` bounds before building anything)."""
        d, h = config.dim, config.hidden
        n_params = TRANSFORMS[config.transform].n_params
        scaling = d if config.scaling else 0
        if config.arch == "multiscale":
            total = 0
            for kind, _, (c, _, _) in multiscale_layout(config.sample_shape, config.n_scales):
                if kind in ("checkerboard", "channel"):
                    # conv3x3 in, depth x (conv3x3 + conv1x1), conv3x3 out; [ActNorm of the image]
                    total += (9 * c + 1) * h + config.depth * ((9 * h + 1) * h + (h + 1) * h)
                    total += (9 * h + 1) * c * n_params + (2 * c if config.norm == "actnorm" else 0)
            return total + scaling
        out = d * n_params
        conditioner = (d + 1) * h + (config.depth - 1) * (h + 1) * h + (h + 1) * out
        per_layer = conditioner + (2 * d if config.norm == "actnorm" else 0)
        return config.n_couplings * per_layer + scaling
