"""Inpainting with a density model: fill the unknown pixels by gradient ascent on ``log p(x)``.

NICE (Dinh et al. 2015, sec. 5.2) inpaints by projected gradient ascent on the log-likelihood
over the hidden pixels ``x_H`` with the observed ``x_O`` held fixed::

    x_H <- clip(x_H + lr * d log p(x_O, x_H) / d x_H)

Here the ascent uses Adam (scale-free steps), clipped to the data range [-1, 1].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from notelab.core.errors import ConfigError, ShapeError


def inpaint(
    log_prob: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    known: torch.Tensor,
    init: torch.Tensor | None = None,
    steps: int = 200,
    lr: float = 0.05,
) -> torch.Tensor:
    """``x`` with its entries where ``known == 0`` replaced by a local maximum of ``log_prob`` (see module doc).

    ``known`` broadcasts against ``x`` (1: observed, 0: to fill); ``init`` starts the hidden
    entries (default 0, the middle of the range).
    """
    if steps < 1 or not lr > 0:
        raise ConfigError(f"inpaint: expected steps >= 1 and lr > 0, got {steps}, {lr}")
    known = torch.as_tensor(known, dtype=x.dtype, device=x.device).expand_as(x)
    if init is not None and init.shape != x.shape:
        raise ShapeError(f"inpaint: expected init of shape {tuple(x.shape)}, got {tuple(init.shape)}")
    hidden = (init if init is not None else torch.zeros_like(x)).clone().requires_grad_(True)
    opt = torch.optim.Adam([hidden], lr=lr)
    for _ in range(steps):
        full = known * x + (1 - known) * hidden
        loss = -log_prob(full).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            hidden.clamp_(-1, 1)
    return (known * x + (1 - known) * hidden).detach()
