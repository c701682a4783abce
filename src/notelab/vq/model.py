"""VQ-VAE for images (van den Oord et al. 2017, sec. 4.1): conv encoder -> quantiser -> conv decoder.

    x (B, C, H, W) -> encoder -> z_e (B, D, H/f, W/f) -> VectorQuantizer -> z_q -> decoder -> x_hat
    loss = ||x - x_hat||^2 + L_vq                    (eq. 3 with a Gaussian decoder of fixed variance)

The encoder is ``log2 f`` stride-2 4x4 convolutions then residual blocks (ReLU, 3x3 conv, ReLU,
1x1 conv: the paper's), the decoder mirrors it with transposed convolutions. ``encode`` gives the
code grid (B, H/f, W/f) of integers, ``decode`` maps such a grid back to images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.checkpoint import PretrainedMixin
from notelab.core.denoisers import ResidualBlock
from notelab.core.errors import ConfigError, DataError, ShapeError
from notelab.vq.quantizer import VectorQuantizer, check_indices, check_quantizer_args


@dataclass
class VQVAEConfig:
    in_channels: int = 1  # image channels C
    image_size: int = 8  # H = W of the training images
    hidden: int = 64  # conv width
    res_blocks: int = 2  # residual blocks in the encoder and in the decoder
    downsample: int = 2  # f: the code grid is (H/f, W/f); a power of 2 (1: no downsampling)
    code_dim: int = 16  # D of the code vectors
    codebook_size: int = 64  # K
    beta: float = 0.25  # commitment weight
    ema: bool = True  # EMA codebook (VQ-VAE-2) instead of the codebook loss
    decay: float = 0.99  # EMA decay gamma
    eps: float = 1e-5  # Laplace smoothing
    dead_code_threshold: float = 0.0  # restart codes used by fewer vectors per batch (0: never)
    kmeans_init: bool = False  # codebook from k-means on the first training batch

    def __post_init__(self) -> None:
        for name in ("in_channels", "image_size", "hidden", "downsample", "code_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"VQVAEConfig.{name}: expected an integer >= 1, got {value!r}")
        if not isinstance(self.res_blocks, int) or self.res_blocks < 0:
            raise ConfigError(f"VQVAEConfig.res_blocks: expected an integer >= 0, got {self.res_blocks!r}")
        if self.downsample & (self.downsample - 1):
            raise ConfigError(f"VQVAEConfig.downsample: expected a power of 2, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ConfigError(
                f"VQVAEConfig: image_size {self.image_size} must be a multiple of downsample {self.downsample}"
            )
        check_quantizer_args(
            self.codebook_size, self.code_dim, self.beta, self.decay, self.eps, self.dead_code_threshold
        )

    @property
    def grid(self) -> tuple[int, int]:
        """The code grid (H/f, W/f) of a training-size image."""
        side = self.image_size // self.downsample
        return side, side


def encoder(c: VQVAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c.in_channels, c.hidden, 3, padding=1)]
    for _ in range(int(math.log2(c.downsample))):
        layers += [nn.ReLU(), nn.Conv2d(c.hidden, c.hidden, 4, stride=2, padding=1)]
    layers += [ResidualBlock(c.hidden, c.hidden) for _ in range(c.res_blocks)]
    layers += [nn.ReLU(), nn.Conv2d(c.hidden, c.code_dim, 1)]
    return nn.Sequential(*layers)


def decoder(c: VQVAEConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c.code_dim, c.hidden, 3, padding=1)]
    layers += [ResidualBlock(c.hidden, c.hidden) for _ in range(c.res_blocks)]
    for _ in range(int(math.log2(c.downsample))):
        layers += [nn.ReLU(), nn.ConvTranspose2d(c.hidden, c.hidden, 4, stride=2, padding=1)]
    layers += [nn.ReLU(), nn.Conv2d(c.hidden, c.in_channels, 3, padding=1)]
    return nn.Sequential(*layers)


class VQVAE(PretrainedMixin, nn.Module):
    """``forward(x) -> (x_hat, indices, vq_loss, stats)``; ``encode`` / ``decode`` through integer codes."""

    config_class = VQVAEConfig
    model_type = "vqvae"

    def __init__(self, config: VQVAEConfig) -> None:
        super().__init__()
        self.config = c = config
        self.encoder = encoder(c)
        self.quantizer = VectorQuantizer(
            c.codebook_size, c.code_dim, c.beta, c.ema, c.decay, c.eps, c.dead_code_threshold, c.kmeans_init
        )
        self.decoder = decoder(c)

    def check_images(self, x: torch.Tensor) -> None:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ShapeError(f"VQVAE: expected images (B, {c.in_channels}, H, W), got shape {tuple(x.shape)}")
        if x.shape[2] % c.downsample or x.shape[3] % c.downsample:
            raise ShapeError(
                f"VQVAE: expected H and W multiples of downsample {c.downsample}, got {tuple(x.shape[2:])}"
            )
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(x).all()):
            raise DataError("VQVAE: expected finite pixel values, got NaN or Inf")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        self.check_images(x)
        z_q, indices, vq_loss, stats = self.quantizer(self.encoder(x))
        return self.decoder(z_q), indices, vq_loss, stats

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Code grid (B, H/f, W/f), int64; no codebook update."""
        self.check_images(x)
        z = self.encoder(x)
        rows = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])
        idx, _ = self.quantizer.quantize_rows(rows)
        return idx.reshape(z.shape[0], z.shape[2], z.shape[3])

    @torch.no_grad()
    def decode(self, indices: torch.Tensor) -> torch.Tensor:
        """Images (B, C, f h, f w) from a code grid (B, h, w); codes outside [0, K) are a ShapeError."""
        if indices.ndim != 3:
            raise ShapeError(f"VQVAE.decode: expected a code grid (B, h, w), got shape {tuple(indices.shape)}")
        check_indices(indices, self.config.codebook_size)
        e = self.quantizer.lookup(indices.to(self.quantizer.codebook.device))  # (B, h, w, D)
        return self.decoder(e.permute(0, 3, 1, 2))


def vqvae_loss(model: nn.Module, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple:
    """``fit``'s loss: reconstruction MSE + the quantiser's loss, with the codebook statistics as metrics."""
    x_hat, _, vq_loss, stats = model(x)
    mse = F.mse_loss(x_hat, x)
    metrics = {"mse": float(mse.detach()), **{k: float(v) for k, v in stats.items()}}
    return mse + vq_loss, metrics
