"""Training a VQ-VAE through ``notelab.train.fit`` and measuring it (reconstruction, codebook use)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from notelab.core.errors import ConfigError
from notelab.core.runtime import seed_everything
from notelab.train import FitResult, TrainConfig, fit, plot_history
from notelab.vq.model import VQVAE, VQVAEConfig, vqvae_loss
from notelab.vq.quantizer import code_counts, perplexity


def config_for(sample_shape: tuple[int, ...], **overrides: Any) -> VQVAEConfig:
    """A :class:`VQVAEConfig` for images of ``sample_shape`` (C, H, H); ``overrides`` replace fields."""
    if len(sample_shape) != 3 or sample_shape[1] != sample_shape[2]:
        raise ConfigError(f"VQ-VAE: expected square images (C, H, H), got sample shape {tuple(sample_shape)}")
    return VQVAEConfig(in_channels=sample_shape[0], image_size=sample_shape[1], **overrides)


def fit_vqvae(x: torch.Tensor, config: VQVAEConfig, train_config: TrainConfig, callbacks: tuple = ()) -> FitResult:
    """Train ``VQVAE(config)`` on images ``x`` (N, C, H, W) with :func:`notelab.train.fit`."""
    if tuple(x.shape[1:]) != (config.in_channels, config.image_size, config.image_size):
        raise ConfigError(
            f"VQ-VAE: the data has images {tuple(x.shape[1:])}, the config says "
            f"{(config.in_channels, config.image_size, config.image_size)}"
        )
    seed_everything(train_config.seed)  # the initial weights and codebook are the run's
    return fit(VQVAE(config), vqvae_loss, x.float(), train_config, callbacks=callbacks)


def train_vqvae(x: torch.Tensor, out_dir: str | os.PathLike, train_config: TrainConfig, config: VQVAEConfig) -> VQVAE:
    """:func:`fit_vqvae` into a run folder: ``config.json`` + ``model.safetensors``, ``log.jsonl``, ``loss.png``."""
    out_dir = Path(out_dir)
    result = fit_vqvae(x, config, dataclasses.replace(train_config, out_dir=str(out_dir)))
    model = result.model.cpu().eval()
    model.save_pretrained(out_dir)
    if (out_dir / "log.jsonl").is_file():
        plot_history(out_dir / "log.jsonl", out_dir / "loss.png")
    return model


@torch.no_grad()
def evaluate(model: VQVAE, x: torch.Tensor, batch_size: int = 256) -> dict[str, float]:
    """Reconstruction MSE, codebook perplexity and codes never used ("dead") over images ``x``."""
    device = next(model.parameters()).device
    model.eval()
    sq, counts = 0.0, torch.zeros(model.config.codebook_size)
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device)
        idx = model.encode(xb)
        sq += float(F.mse_loss(model.decode(idx), xb, reduction="sum"))
        counts += code_counts(idx.flatten().cpu(), model.config.codebook_size)
    return {
        "mse": sq / x.numel(),
        "perplexity": float(perplexity(counts)),
        "dead_codes": float((counts == 0).sum()),
    }
