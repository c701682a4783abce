"""The OadTR training loss (Wang et al. 2021, eq. 9), the ambiguous class ignored as in the official criterion.

For logits ``z`` and a one-hot (or soft) target ``y`` over ``C`` classes with the ambiguous class
``a``, let ``K = {0..C-1} \\ {a}``; a row whose target is the ambiguous class is dropped, the others give::

    CE(z, y) = - sum_{k in K} y_k log softmax(z_K)_k            (the ambiguous logit never enters)

averaged over the kept rows (0 when none is kept). The total is
``CE(current) + future_weight * CE(future)`` with ``future_weight = 0.5`` and the future rows
``(B * Q)`` averaged together.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from notelab.core.errors import ShapeError
from notelab.oad.oadtr import OADOutput


def ignore_ambiguous_cross_entropy(logits: torch.Tensor, target: torch.Tensor, ambiguous: int | None) -> torch.Tensor:
    """``CE`` of the module docstring over rows ``(N, C)``."""
    if logits.shape != target.shape or logits.ndim != 2:
        raise ShapeError(
            f"loss: expected logits and targets of one shape (N, C), got {tuple(logits.shape)} and "
            f"{tuple(target.shape)}"
        )
    target = target.to(logits.dtype)
    if ambiguous is None:
        return -(target * F.log_softmax(logits, dim=-1)).sum(-1).mean()
    keep = [k for k in range(logits.shape[-1]) if k != ambiguous]
    per_row = -(target[:, keep] * F.log_softmax(logits[:, keep], dim=-1)).sum(-1)
    # A weighted mean rather than per_row[rows].mean(): no host sync to size the kept rows, and when
    # every row is ambiguous the loss is 0 with the graph (and DDP's reducer) intact.
    rows = (target[:, ambiguous] != 1).to(per_row.dtype)
    return (per_row * rows).sum() / rows.sum().clamp(min=1.0)


def oad_loss(
    output: OADOutput,
    label: torch.Tensor,
    future: torch.Tensor | None,
    ambiguous: int | None,
    future_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``CE(current) + future_weight * CE(future)``; models without anticipation get ``CE(current)``.

    The metrics are detached 0-d tensors: the training loop reads them after ``backward`` is queued,
    so the host does not wait for the forward pass before launching the backward one.
    """
    current = ignore_ambiguous_cross_entropy(output.logits, label, ambiguous)
    metrics = {"ce_current": current.detach()}
    if output.future is None or future is None or output.future.shape[1] == 0:
        return current, metrics
    if output.future.shape != future.shape:
        raise ShapeError(f"loss: expected future targets {tuple(output.future.shape)}, got {tuple(future.shape)}")
    ahead = ignore_ambiguous_cross_entropy(output.future.flatten(0, 1), future.flatten(0, 1), ambiguous)
    metrics["ce_future"] = ahead.detach()
    return current + future_weight * ahead, metrics
