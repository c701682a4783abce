"""Tiny models, losses and data shared by the train tests and their subprocess workers."""

from __future__ import annotations

import torch
from torch import nn

from notelab.train import TrainConfig, fit


def toy_model(seed: int = 0, hidden: int = 16, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(3, hidden), nn.Tanh(), nn.Dropout(dropout), nn.LayerNorm(hidden), nn.Linear(hidden, 1)
    )


def toy_data(n: int = 64, seed: int = 1) -> torch.Tensor:
    """Rows [x (3), y (1)] of a noisy linear regression."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=g)
    return torch.cat([x, y], dim=1)


def mse_loss(model: nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return ((model(batch[:, :3]) - batch[:, 3:]) ** 2).mean()


def noisy_loss(model: nn.Module, batch: torch.Tensor, generator: torch.Generator):
    """Uses the generator like a diffusion loss does (input noise), and reports a metric."""
    x = batch[:, :3] + 0.1 * torch.randn(batch.shape[0], 3, generator=generator, device=batch.device)
    loss = ((model(x) - batch[:, 3:]) ** 2).mean()
    return loss, {"pred_mean": model(x).mean().item()}


def resume_config(out_dir: str, **kw) -> TrainConfig:
    base = dict(
        steps=10,
        batch_size=8,
        grad_accum=2,
        lr=1e-2,
        warmup_steps=2,
        weight_decay=0.1,
        ema_decay=0.9,
        ckpt_every=3,
        log_every=2,
        out_dir=out_dir,
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)


def run_resumable(out_dir: str, *, resume: bool = False, callbacks=(), seed: int = 0, **kw):
    """The run the exact-resume tests interrupt: dropout, generator noise, EMA, accumulation, epochs wrap."""
    model = toy_model(seed=seed, dropout=0.2)
    return fit(model, noisy_loss, toy_data(40), resume_config(out_dir, resume=resume, **kw), callbacks=callbacks)
