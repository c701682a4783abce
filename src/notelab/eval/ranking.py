"""Ranking metrics for binary detection: area under the precision-recall curve and under the ROC curve.

A detector gives each item a score (higher: more likely positive, e.g. "hallucinated"); both metrics
sweep a threshold over the distinct scores, so items with tied scores enter together.

    AUC-PR (average precision)   AP  = sum_n (R_n - R_{n-1}) P_n
    AUC-ROC                      AUC = trapezoidal area under (FPR_n, TPR_n), from (0, 0) to (1, 1)

with ``P_n``, ``R_n`` the precision and recall of "score >= the n-th largest distinct score". This is
the step-wise average precision of scikit-learn's ``average_precision_score`` (not the trapezoidal
area, which is optimistic; Davis & Goadrich 2006, "The relationship between precision-recall and ROC
curves", ICML) and the ROC area of ``roc_auc_score``, where a tie between a positive and a negative
counts one half (the Mann-Whitney U statistic divided by n_pos * n_neg). SelfCheckGPT (Manakul et al.
2023, Table 2) reports AUC-PR; its random baseline is the positive rate.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from notelab.core.errors import DataError

ArrayLike = Sequence[float] | Sequence[int] | Sequence[bool] | np.ndarray


def _check(labels: ArrayLike, scores: ArrayLike, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(labels as 0/1 floats, scores as float64), or a one-line DataError naming what is wrong."""
    y = np.asarray(labels)
    s = np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.ndim != 1 or len(y) != len(s):
        raise DataError(
            f"{metric}: expected labels and scores as two 1-D sequences of one length, got shapes "
            f"{y.shape} and {s.shape}"
        )
    if len(y) == 0:
        raise DataError(f"{metric}: expected at least one labelled item, got none")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise DataError(f"{metric}: expected labels 0/1 (or booleans), got values {sorted(set(y.tolist()))[:5]}")
    if not np.isfinite(s).all():
        raise DataError(f"{metric}: expected finite scores, got {int((~np.isfinite(s)).sum())} NaN or infinite")
    y = y.astype(np.float64)
    positives = int(y.sum())
    if positives in (0, len(y)):
        kind = "positive" if positives else "negative"
        raise DataError(
            f"{metric}: expected both positive and negative labels, got {len(y)} items, all {kind} "
            "(the metric is undefined for one class)"
        )
    return y, s


def _cumulative_counts(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """True and false positives of "score >= threshold", one entry per distinct score, largest first."""
    order = np.argsort(-s, kind="mergesort")
    y, s = y[order], s[order]
    # the last index of each run of tied scores: ties enter together
    ends = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tps = np.cumsum(y)[ends]
    fps = (ends + 1) - tps
    return tps, fps


def auc_pr(labels: ArrayLike, scores: ArrayLike) -> float:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` over the distinct thresholds (module docstring)."""
    y, s = _check(labels, scores, "auc_pr")
    tps, fps = _cumulative_counts(y, s)
    precision = tps / (tps + fps)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def auc_roc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Trapezoidal area under the ROC curve; a tied positive-negative pair counts 1/2 (module docstring)."""
    y, s = _check(labels, scores, "auc_roc")
    tps, fps = _cumulative_counts(y, s)
    tpr = np.r_[0.0, tps / tps[-1]]
    fpr = np.r_[0.0, fps / fps[-1]]
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


__all__ = ["auc_pr", "auc_roc"]
