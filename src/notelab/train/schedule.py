"""Learning-rate schedules as pure functions of the step.

Linear warmup then cosine decay (Loshchilov & Hutter 2017, SGDR eq. 5, without restarts), as
used by GPT-style training. With ``W = warmup_steps``, ``S = steps``, ``r = min_lr_ratio``::

    m(s) = s / W                                                   s < W      (linear from 0)
    m(s) = r + (1 - r) * (1 + cos(pi * (s - W) / (S - W))) / 2     W <= s     (cosine)
    lr(s) = lr * m(s)

``s`` is the 0-based index of the optimizer step about to be taken. This is the shape of
``transformers.get_cosine_schedule_with_warmup``: step 0 runs at lr 0 (Adam's moments still
see its gradient), the peak is reached at ``s = W``, and the cosine reaches ``lr * r`` at
``s = S`` (one past the last step) and stays there if training continues.
"""

from __future__ import annotations

import math

from notelab.train.config import TrainConfig


def warmup_cosine(step: int, steps: int, warmup_steps: int = 0, min_lr_ratio: float = 0.0) -> float:
    """The multiplier ``m(s)`` above: linear warmup, then cosine from 1 to ``min_lr_ratio``."""
    if step < warmup_steps:
        return step / warmup_steps
    span = max(steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_constant(step: int, warmup_steps: int = 0) -> float:
    """Linear warmup, then 1."""
    return step / warmup_steps if step < warmup_steps else 1.0


def lr_multiplier(step: int, config: TrainConfig) -> float:
    """The multiplier of ``config.lr`` at ``step`` for ``config.schedule``."""
    if config.schedule == "constant":
        return warmup_constant(step, config.warmup_steps)
    return warmup_cosine(step, config.steps, config.warmup_steps, config.min_lr_ratio)


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of optimizer step ``step`` (0-based) under ``config``."""
    return config.lr * lr_multiplier(step, config)
