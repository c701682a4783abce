"""HaluEval-style labelled detection files, scored with AUC-PR / AUC-ROC (Li et al. 2023, "HaluEval: A
Large-Scale Hallucination Evaluation Benchmark for Large Language Models").

A detection item is a prompt, a response and a label (hallucinated or not). The files are JSON lines
(or one JSON list) in the layouts of the HaluEval release:

    general        {"ID", "user_query", "chatgpt_response", "hallucination": "yes"|"no", ...}
    qa             {"knowledge", "question", "right_answer", "hallucinated_answer"}        -> 2 items
    dialogue       {"knowledge", "dialogue_history", "right_response", "hallucinated_response"} -> 2 items
    summarization  {"document", "right_summary", "hallucinated_summary"}                 -> 2 items

(a paired row gives one item with its right answer, label 0, and one with its hallucinated answer,
label 1). A detector maps (prompt, response) to a score, higher = more likely hallucinated; its
ranking of the items is summarised by AUC-PR (average precision; the random detector's is the
positive rate) and AUC-ROC (random: 0.5), :mod:`notelab.eval.ranking`. An item a detector cannot
score (it raises a :class:`NotelabError`) is recorded as failed and left out of the metrics, never
a crash of the whole run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from notelab.core.errors import DataError, NotelabError
from notelab.eval.ranking import auc_pr, auc_roc

PAIRED = {  # layout -> (prompt fields, right field, hallucinated field)
    "qa": (("knowledge", "question"), "right_answer", "hallucinated_answer"),
    "dialogue": (("knowledge", "dialogue_history"), "right_response", "hallucinated_response"),
    "summarization": (("document",), "right_summary", "hallucinated_summary"),
}
GENERAL = ("user_query", "chatgpt_response", "hallucination")


@dataclass(frozen=True)
class DetectionItem:
    id: str  # "file:line" (and ":right" / ":hallucinated" for a paired row)
    prompt: str
    response: str
    hallucinated: bool


@dataclass
class DetectionResult:
    auc_pr: float
    auc_roc: float
    positive_rate: float  # the random detector's AUC-PR
    n: int  # items scored
    scores: list[float] = field(default_factory=list)
    labels: list[bool] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # item id -> why it could not be scored


def _layout(obj: dict[str, Any]) -> str | None:
    if all(k in obj for k in GENERAL):
        return "general"
    for name, (prompt, right, wrong) in PAIRED.items():
        if all(k in obj for k in (*prompt, right, wrong)):
            return name
    return None


def _items(where: str, obj: object) -> list[DetectionItem]:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    layout = _layout(obj)
    if layout is None:
        raise DataError(
            f"{where}: expected HaluEval fields ({', '.join(GENERAL)}; or a qa / dialogue / summarization "
            f"row), got keys {', '.join(sorted(obj))}"
        )
    if layout == "general":
        query, response, label = (obj[k] for k in GENERAL)
        if not isinstance(query, str) or not isinstance(response, str):
            raise DataError(f"{where}: expected string user_query and chatgpt_response")
        if label not in ("yes", "no"):
            raise DataError(f"{where}: expected hallucination 'yes' or 'no', got {label!r}")
        return [DetectionItem(where, query, response, label == "yes")]
    prompt_keys, right, wrong = PAIRED[layout]
    values = [obj[k] for k in (*prompt_keys, right, wrong)]
    bad = [k for k, v in zip((*prompt_keys, right, wrong), values) if not isinstance(v, str)]
    if bad:
        raise DataError(f"{where}: expected string values, got {type(obj[bad[0]]).__name__} for {bad[0]!r}")
    prompt = "\n".join(obj[k] for k in prompt_keys)
    return [
        DetectionItem(f"{where}:right", prompt, obj[right], False),
        DetectionItem(f"{where}:hallucinated", prompt, obj[wrong], True),
    ]


def load_halueval(path: str | os.PathLike, limit: int | None = None) -> list[DetectionItem]:
    """The detection items of a HaluEval file (JSON lines or one JSON list); a malformed row is a
    :class:`DataError` naming its line (its index for a list). ``limit``: the first rows only."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a HaluEval JSON file at {path}, found no file")
    text = path.read_text(encoding="utf-8")
    items: list[DetectionItem] = []
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: expected a JSON list, got invalid JSON ({e.msg})") from e
        for i, obj in enumerate(rows[:limit]):
            items += _items(f"{path}: entry {i}", obj)
    else:
        count = 0
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            if limit is not None and count >= limit:
                break
            count += 1
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: expected a JSON object, got invalid JSON ({e.msg})") from e
            items += _items(f"{path}:{lineno}", obj)
    if not items:
        raise DataError(f"{path}: expected at least one labelled row, found none")
    return items


def detection_metrics(labels: Sequence[bool], scores: Sequence[float]) -> tuple[float, float, float]:
    """(AUC-PR, AUC-ROC, positive rate); both classes must be present."""
    if len(set(labels)) < 2:
        raise DataError(f"detection: expected both hallucinated and correct items, got only {bool(labels[0])!r}")
    return auc_pr(labels, scores), auc_roc(labels, scores), sum(labels) / len(labels)


def evaluate_detector(items: Sequence[DetectionItem], score: Callable[[DetectionItem], float]) -> DetectionResult:
    """Score every item with ``score`` (higher = more likely hallucinated) and rank them against the
    labels; items whose scoring fails with a notelab error (or gives a non-finite score) are recorded."""
    scores, labels, failed = [], [], {}
    for item in items:
        try:
            value = float(score(item))
        except NotelabError as e:
            failed[item.id] = str(e)
            continue
        if value != value or value in (float("inf"), float("-inf")):
            failed[item.id] = f"non-finite score {value}"
            continue
        scores.append(value)
        labels.append(item.hallucinated)
    if not scores:
        raise DataError(f"detection: every one of {len(items)} items failed; first: {next(iter(failed.values()))}")
    pr, roc, rate = detection_metrics(labels, scores)
    return DetectionResult(pr, roc, rate, len(scores), scores, labels, failed)


__all__ = ["DetectionItem", "DetectionResult", "detection_metrics", "evaluate_detector", "load_halueval"]
