"""Per-frame detection metrics of online action detection: AP, mAP, calibrated AP and mcAP.

Frames are ranked by their score for a class ``c``; at the ``k``-th distinct threshold
(scores sorted in decreasing order, tied frames entering together) let ``TP_k`` and ``FP_k`` count
the positive and negative frames scored at least that high, ``P`` the positives, ``N`` the
negatives. Then (Shou et al. 2017, the per-frame protocol of THUMOS'14)::

    AP   = sum_k (TP_k - TP_{k-1}) / P * Prec_k,       Prec_k  = TP_k / (TP_k + FP_k)
    cAP  = sum_k (TP_k - TP_{k-1}) / P * cPrec_k,      cPrec_k = w TP_k / (w TP_k + FP_k),  w = N / P

``AP`` is scikit-learn's ``average_precision_score``; the calibrated precision (De Geest et al.
2016, "Online Action Detection", sec. 5) weighs positives by ``w`` so that a class's score no
longer depends on its share of the frames (TVSeries' mcAP is the mean cAP). Without ties both
equal the per-positive sums of the OadTR / TRN evaluation (``frame_level_map_n_cap``).

Official protocol (OadTR ``test.py``): the scores are the softmax over every class but the
ambiguous one (:func:`drop_ambiguous_softmax`), the labels the one-hot rows without the ambiguous
column; the mean runs over the action classes, background (column 0) left out. A class with no
positive frame has no AP (the official code divides by zero); it is left out of the mean and
listed in ``DetectionScores.no_positives``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from notelab.core.errors import ShapeError


def ranked_counts(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cumulative ``(TP_k, FP_k)`` at each distinct score threshold, highest first (ties grouped)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order].astype(np.float64)
    tp, fp = np.cumsum(y), np.cumsum(1.0 - y)
    last_of_tie = np.r_[s[1:] != s[:-1], True]  # a threshold is reached only after its whole tie group
    return tp[last_of_tie], fp[last_of_tie]


def _check_pair(scores: np.ndarray, positive: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores, positive = np.asarray(scores, dtype=np.float64), np.asarray(positive)
    if scores.ndim != 1 or positive.shape != scores.shape:
        raise ShapeError(f"expected scores and labels of one shape (N,), got {scores.shape} and {positive.shape}")
    if not np.isfinite(scores).all():
        raise ShapeError(f"expected finite scores, got {int((~np.isfinite(scores)).sum())} NaN/inf value(s)")
    return scores, positive.astype(bool)


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """AP of one class (module docstring); NaN when no frame is positive."""
    scores, positive = _check_pair(scores, positive)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    tp, fp = ranked_counts(scores, positive)
    gained = np.diff(tp, prepend=0.0)
    return float(np.sum(gained / n_pos * tp / (tp + fp)))


def calibrated_average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """cAP of one class, positives weighted by ``w = #negatives / #positives``; NaN without positives."""
    scores, positive = _check_pair(scores, positive)
    n_pos = int(positive.sum())
    if n_pos == 0:
        return float("nan")
    w = (positive.size - n_pos) / n_pos
    tp, fp = ranked_counts(scores, positive)
    gained = np.diff(tp, prepend=0.0)
    return float(np.sum(gained / n_pos * (w * tp) / (w * tp + fp)))


@dataclass
class DetectionScores:
    """Per-frame scores over the evaluated classes (column index -> value)."""

    mAP: float  # mean AP over the evaluated classes that have a positive frame
    mcAP: float  # mean calibrated AP over the same classes
    ap: dict[int, float] = field(default_factory=dict)
    cap: dict[int, float] = field(default_factory=dict)
    no_positives: list[int] = field(default_factory=list)  # evaluated columns without a positive frame


def frame_map(scores: np.ndarray, labels: np.ndarray, ignore: Sequence[int] = (0,)) -> DetectionScores:
    """Per-frame mAP and mcAP of ``scores`` ``(N, K)`` against one-hot / multi-hot ``labels`` ``(N, K)``.

    Column ``c`` is evaluated unless it is in ``ignore`` (background, 0, by default); a label ``>= 0.5``
    is a positive (the official code tests ``== 1`` on 0/1 rows).
    """
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 2 or labels.shape != scores.shape:
        raise ShapeError(
            f"frame_map: expected scores and labels of one shape (N, K), got {scores.shape}, {labels.shape}"
        )
    if scores.shape[0] == 0:
        raise ShapeError("frame_map: expected at least one frame, got 0")
    out = DetectionScores(mAP=float("nan"), mcAP=float("nan"))
    for c in range(scores.shape[1]):
        if c in ignore:
            continue
        positive = labels[:, c] >= 0.5
        if not positive.any():
            out.no_positives.append(c)
            continue
        out.ap[c] = average_precision(scores[:, c], positive)
        out.cap[c] = calibrated_average_precision(scores[:, c], positive)
    if out.ap:
        out.mAP = float(np.mean(list(out.ap.values())))
        out.mcAP = float(np.mean(list(out.cap.values())))
    return out


def drop_ambiguous_softmax(logits: torch.Tensor, ambiguous: int | None) -> torch.Tensor:
    """Softmax over every class but ``ambiguous`` (its column removed), as the official evaluation scores."""
    if ambiguous is not None:
        keep = [c for c in range(logits.shape[-1]) if c != ambiguous]
        logits = logits[..., keep]
    return torch.softmax(logits.float(), dim=-1)


def drop_column(labels: np.ndarray, column: int | None) -> np.ndarray:
    """``labels`` ``(..., C)`` without ``column`` (the ambiguous class), to pair with :func:`drop_ambiguous_softmax`."""
    return labels if column is None else np.delete(labels, column, axis=-1)


def future_step_map(scores: np.ndarray, labels: np.ndarray, ignore: Sequence[int] = (0,)) -> list[float]:
    """Per-frame mAP of each anticipated step: ``scores``, ``labels`` ``(N, Q, K)`` -> ``Q`` values."""
    scores, labels = np.asarray(scores), np.asarray(labels)
    if scores.ndim != 3 or labels.shape != scores.shape:
        raise ShapeError(f"future_step_map: expected (N, Q, K) scores and labels, got {scores.shape}, {labels.shape}")
    return [frame_map(scores[:, q], labels[:, q], ignore).mAP for q in range(scores.shape[1])]
