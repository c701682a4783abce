"""Two time-conditioned networks ``f(x, t)`` for generative models: an MLP for points and a small UNet.

They know nothing of diffusion or flows: any family passes ``x`` of shape ``(B, D)`` or
``(B, C, H, W)`` and a timestep ``t`` of shape ``(B,)`` (integer step or continuous time) and
gets an output shaped like ``x``.

UNet (Ronneberger et al. 2015) as used by DDPM (Ho et al. 2020, appendix B), scaled down: a
residual block is ``GroupNorm -> SiLU -> Conv -> (+ time) -> GroupNorm -> SiLU -> Dropout -> Conv``
plus a skip; self-attention runs at the lowest resolution::

    x -> conv_in -> [ResBlock x n, Down] per level -> mid (Res, Attn, Res)
      -> [ResBlock x (n+1) with skip concat, Up] per level -> GroupNorm, SiLU, conv_out
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.checkpoint import PretrainedMixin
from notelab.core.embeddings import TimestepEmbedding
from notelab.core.errors import ShapeError


@dataclass
class MLPDenoiserConfig:
    dim: int = 2  # data dimension D
    hidden: int = 256  # width of the hidden layers
    n_layers: int = 4  # hidden layers
    time_dim: int = 64  # sinusoidal time features
    time_scale: float = 1.0  # t is multiplied by this before embedding (use 1000 for t in [0, 1])


class MLPDenoiser(PretrainedMixin, nn.Module):
    """``f(x, t)`` for points ``x`` of shape ``(B, D)``: an MLP on [x, emb(t)] with SiLU."""

    config_class = MLPDenoiserConfig
    model_type = "mlp_denoiser"

    def __init__(self, config: MLPDenoiserConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.time = TimestepEmbedding(c.time_dim, c.hidden)
        self.inp = nn.Linear(c.dim, c.hidden)
        self.layers = nn.ModuleList(nn.Linear(c.hidden, c.hidden) for _ in range(c.n_layers))
        self.out = nn.Linear(c.hidden, c.dim)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ShapeError(f"MLPDenoiser: expected x of shape (B, {self.config.dim}), got {tuple(x.shape)}")
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        h = self.inp(x) + self.time(t * self.config.time_scale)
        for layer in self.layers:
            h = h + layer(F.silu(h))
        return self.out(F.silu(h))


@dataclass
class UNetConfig:
    in_channels: int = 1  # image channels C
    image_size: int = 8  # H = W
    base_channels: int = 64  # channels at the first level
    channel_mults: tuple[int, ...] = (1, 2)  # channels per level = base * mult; one downsample between levels
    num_res_blocks: int = 2  # residual blocks per level
    attn_heads: int = 4  # heads of the self-attention at the lowest resolution (0 = none)
    dropout: float = 0.0
    groups: int = 8  # GroupNorm groups
    time_scale: float = 1.0  # t is multiplied by this before embedding (use 1000 for t in [0, 1])

    def __post_init__(self) -> None:
        down = 2 ** (len(self.channel_mults) - 1)
        if self.image_size % down:
            raise ValueError(f"UNetConfig: image_size {self.image_size} must be divisible by {down}")


class ResidualBlock(nn.Module):
    """``x + conv1x1(relu(conv3x3(relu(x))))`` (VQ-VAE sec. 4.1): no time input, unlike the UNet's."""

    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int, groups: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(min(groups, cin), cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(tdim, cout)
        self.norm2 = nn.GroupNorm(min(groups, cout), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.drop(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention2d(nn.Module):
    """Multi-head self-attention over the H*W positions of a feature map, residual."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(min(groups, channels), channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class UNet(PretrainedMixin, nn.Module):
    """``f(x, t)`` for images ``x`` of shape ``(B, C, H, W)``."""

    config_class = UNetConfig
    model_type = "unet"

    def __init__(self, config: UNetConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        chans = [c.base_channels * m for m in c.channel_mults]
        tdim = 4 * c.base_channels
        self.time = TimestepEmbedding(c.base_channels, tdim)
        self.conv_in = nn.Conv2d(c.in_channels, chans[0], 3, padding=1)
        self.down = nn.ModuleList()
        skips = [chans[0]]
        cur = chans[0]
        for i, ch in enumerate(chans):
            for _ in range(c.num_res_blocks):
                self.down.append(ResBlock(cur, ch, tdim, c.groups, c.dropout))
                cur = ch
                skips.append(cur)
            if i < len(chans) - 1:
                self.down.append(nn.Conv2d(cur, cur, 3, stride=2, padding=1))
                skips.append(cur)
        self.mid1 = ResBlock(cur, cur, tdim, c.groups, c.dropout)
        self.mid_attn = SelfAttention2d(cur, c.attn_heads, c.groups) if c.attn_heads else nn.Identity()
        self.mid2 = ResBlock(cur, cur, tdim, c.groups, c.dropout)
        self.up = nn.ModuleList()
        for i, ch in reversed(list(enumerate(chans))):
            for _ in range(c.num_res_blocks + 1):
                self.up.append(ResBlock(cur + skips.pop(), ch, tdim, c.groups, c.dropout))
                cur = ch
            if i > 0:
                self.up.append(nn.Upsample(scale_factor=2, mode="nearest"))
        self.norm_out = nn.GroupNorm(min(c.groups, cur), cur)
        self.conv_out = nn.Conv2d(cur, c.in_channels, 3, padding=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels or x.shape[-1] != c.image_size or x.shape[-2] != c.image_size:
            raise ShapeError(
                f"UNet: expected x of shape (B, {c.in_channels}, {c.image_size}, {c.image_size}), got {tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device).expand(x.shape[0])
        temb = self.time(t * c.time_scale)
        h = self.conv_in(x)
        hs = [h]
        for layer in self.down:
            h = layer(h, temb) if isinstance(layer, ResBlock) else layer(h)
            hs.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, temb)), temb)
        for layer in self.up:
            if isinstance(layer, ResBlock):
                h = layer(torch.cat([h, hs.pop()], dim=1), temb)
            else:
                h = layer(h)
        return self.conv_out(F.silu(self.norm_out(h)))
