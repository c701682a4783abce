"""Exponential moving average of weights (Polyak averaging).

    theta_ema <- decay * theta_ema + (1 - decay) * theta

Used by DDPM (Ho et al. 2020, decay 0.9999) and most generative models: sampling from the
averaged weights gives visibly better samples than the last iterate.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """A frozen copy of ``model`` whose floating-point weights track an EMA of ``model``'s."""

    def __init__(self, model: nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def _pairs(self, model: nn.Module) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        ema_t, src_t = [], []
        for e, s in zip(self.model.state_dict().values(), model.state_dict().values()):
            if e.is_floating_point():
                ema_t.append(e)
                src_t.append(s.detach())
        return ema_t, src_t

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards ``model``'s current weights (buffers included)."""
        ema_t, src_t = self._pairs(model)
        torch._foreach_lerp_(ema_t, src_t, 1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state)
