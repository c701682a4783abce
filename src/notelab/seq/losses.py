"""Label-smoothed cross entropy and the Transformer's learning-rate schedule.

Label smoothing (Szegedy et al. 2016, "Rethinking the Inception Architecture", sec. 7): the target
distribution is q'(k) = (1 - eps) delta_{k,y} + eps / V, so with p = softmax(logits)

    L = -sum_k q'(k) log p(k) = (1 - eps) (-log p(y)) + eps * mean_k(-log p(k))

averaged over the non-pad target tokens. The Transformer uses eps_ls = 0.1 (Vaswani et al. 2017,
sec. 5.4); it hurts perplexity and helps BLEU.

The "Noam" schedule (Vaswani et al. 2017, eq. 3), with s the 1-based step::

    lrate(s) = d_model^-0.5 * min(s^-0.5, s * warmup^-1.5)

rises linearly for ``warmup`` steps, then decays as 1/sqrt(s); its peak, at s = warmup, is
d_model^-0.5 * warmup^-0.5 (7.0e-4 for d_model 512, warmup 4000).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.train import unwrap_model


def label_smoothed_ce(
    logits: torch.Tensor, target: torch.Tensor, eps: float = 0.1, pad_id: int | None = 0
) -> torch.Tensor:
    """Mean label-smoothed cross entropy of ``logits`` ``(..., V)`` against ``target`` ``(...)``, pad ignored.

    Computed in float32 whatever the logits' dtype. ``pad_id=None`` counts every position.
    """
    if logits.shape[:-1] != target.shape:
        raise ShapeError(
            f"label_smoothed_ce: expected logits (..., V) over target (...), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    if not 0.0 <= eps < 1.0:
        raise ConfigError(f"label_smoothed_ce: expected eps in [0, 1), got {eps!r}")
    logp = torch.log_softmax(logits.float(), dim=-1)
    real = torch.ones_like(target, dtype=torch.bool) if pad_id is None else target != pad_id
    nll = -logp.gather(-1, target.clamp(min=0)[..., None])[..., 0]
    smooth = -logp.mean(dim=-1)
    loss = (1.0 - eps) * nll + eps * smooth
    return (loss * real).sum() / real.sum().clamp(min=1)


def noam_lr(step: int, d_model: int, warmup: int) -> float:
    """The paper's learning rate at 1-based ``step`` (eq. 3); step 0 is read as step 1."""
    if warmup < 1 or d_model < 1:
        raise ConfigError(f"noam_lr: expected d_model >= 1 and warmup >= 1, got {d_model} and {warmup}")
    s = max(step, 1)
    return d_model**-0.5 * min(s**-0.5, s * warmup**-1.5)


def noam_peak_lr(d_model: int, warmup: int) -> float:
    """The schedule's maximum, d_model^-0.5 * warmup^-0.5: the ``TrainConfig.lr`` that reproduces eq. 3."""
    return noam_lr(warmup, d_model, warmup)


def noam_schedule(warmup: int) -> Callable[[int], float]:
    """An ``lr_fn`` for ``notelab.train.fit``: eq. 3 normalised to peak 1 at ``warmup``.

    ``fit`` uses ``lr = TrainConfig.lr * lr_fn(step)`` with a 0-based ``step``; this returns
    ``noam_lr(step + 1, d, warmup) / noam_peak_lr(d, warmup)`` (independent of d), so ``TrainConfig.lr``
    is the peak learning rate, and ``TrainConfig.lr = noam_peak_lr(d_model, warmup)`` gives the paper's.
    """
    if warmup < 1:
        raise ConfigError(f"noam_schedule: expected warmup >= 1, got {warmup!r}")

    def lr_fn(step: int) -> float:
        s = step + 1
        return min(s**-0.5, s * warmup**-1.5) * warmup**0.5

    return lr_fn


def seq2seq_loss(
    model: torch.nn.Module, batch: Any, generator: torch.Generator | None = None, *, eps: float = 0.1
) -> tuple[torch.Tensor, dict[str, float]]:
    """A ``loss_fn`` for ``fit`` on teacher-forcing batches ``(src, tgt_in, tgt_out)``.

    Returns the label-smoothed loss and, as metrics, the plain cross entropy ``nll`` and the
    token accuracy ``acc`` over non-pad targets. Pad id: the model's ``config.pad_id``.
    """
    src, tgt_in, tgt_out = batch
    pad_id = unwrap_model(model).config.pad_id
    logits = model(src, tgt_in)
    loss = label_smoothed_ce(logits, tgt_out, eps, pad_id)
    with torch.no_grad():
        real = tgt_out != pad_id
        nll = label_smoothed_ce(logits, tgt_out, 0.0, pad_id) if eps else loss.detach()
        acc = ((logits.argmax(-1) == tgt_out) & real).sum() / real.sum().clamp(min=1)
    return loss, {"nll": float(nll), "acc": float(acc)}
