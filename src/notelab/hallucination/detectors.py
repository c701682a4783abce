"""The result every hallucination detector returns, and the detectors that need no sampling: token
uncertainty from the model's own log-probabilities.

Every detector scores a passage sentence by sentence, higher = more likely hallucinated, and gives one
passage score (:class:`DetectorScores`). Token uncertainty (SelfCheckGPT, Manakul et al. 2023, Sec. 4,
the "grey-box" baselines) reads, for each token ``t_j`` of sentence ``i``, ``p_ij = p(t_j | prompt,
t_<j)`` and the entropy ``H_ij = -sum_w p(w | .) log p(w | .)`` of the next-token distribution::

    Avg(-log p)_i = -1/J sum_j log p_ij      Max(-log p)_i = max_j (-log p_ij)
    Avg(H)_i      = 1/J sum_j H_ij

Passage scores follow SelfCheckGPT's document level: the mean over all tokens for Avg(-log p) and
Avg(H), the mean over sentences of Max(-log p).

Every detector calls its model once per batch through :func:`batch_or_each`, which falls back to one
call per item when the backend refuses the batch, so that one bad item is only its own failure.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from notelab.core.errors import DataError, NotelabError, ShapeError
from notelab.hallucination.protocol import LanguageModel, Scored
from notelab.hallucination.text import sentence_spans

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class DetectorScores:
    """One passage scored by one detector: its sentences, a score per sentence and one for the passage
    (higher = more likely hallucinated). ``failed`` says why an item of a batch could not be scored; then
    the scores are empty / NaN and the rest of the batch is unaffected."""

    sentences: list[str]
    sentence_scores: list[float]
    passage_score: float
    failed: str | None = None

    def __post_init__(self) -> None:
        if self.failed is None and len(self.sentences) != len(self.sentence_scores):
            raise ShapeError(
                f"DetectorScores: expected one score per sentence, got {len(self.sentence_scores)} scores "
                f"for {len(self.sentences)} sentences"
            )

    @classmethod
    def failure(cls, reason: str, sentences: Sequence[str] = ()) -> DetectorScores:
        """A recorded failure: no scores, passage score NaN."""
        return cls(list(sentences), [], float("nan"), failed=reason)


def batch_or_each(call: Callable[[list[T]], Sequence[R]], items: Sequence[T]) -> list[R | NotelabError]:
    """``call`` over the whole batch (one model call); when that raises a :class:`NotelabError` (one item
    too long for the model's context, an endpoint refusing one prompt) or answers with the wrong number
    of results, ``call`` over each item alone, so that a bad item costs only itself: its slot then holds
    the error."""

    def checked(batch: list[T]) -> list[R]:
        got = list(call(batch))
        if len(got) != len(batch):
            raise ShapeError(f"expected {len(batch)} results from the model, got {len(got)}")
        return got

    items = list(items)
    if not items:
        return []
    try:
        return list(checked(items))
    except NotelabError as e:
        if len(items) == 1:
            return [e]
    out: list[R | NotelabError] = []
    for item in items:
        try:
            out.extend(checked([item]))
        except NotelabError as e:
            out.append(e)
    return out


def check_passage(passage: str, what: str = "passage") -> None:
    """Raise :class:`DataError` for a passage with no sentence to score."""
    if not isinstance(passage, str) or not passage.strip():
        raise DataError(f"{what}: expected non-empty text, got {passage!r}")


def token_offsets(tokens: Sequence[str], text: str) -> list[int]:
    """The character offset in ``text`` where each token starts.

    Tokens are the model's text pieces of ``text`` in order; their concatenation normally equals
    ``text``, but a backend may drop or alter white space or print a partial UTF-8 character as U+FFFD,
    so each token is looked for from the running cursor (its stripped text, within the next few
    characters) and, when not found, placed at the cursor."""
    offsets = []
    cursor = 0
    for tok in tokens:
        core = tok.strip().lstrip("Ġ▁")  # byte-level BPE / SentencePiece space marks
        at = text.find(core, cursor, cursor + len(tok) + 8) if core else -1
        start = at if at >= 0 else cursor
        offsets.append(min(start, max(len(text) - 1, 0)))
        cursor = start + len(core) if at >= 0 else cursor + len(tok)
    return offsets


def sentence_of_tokens(offsets: Sequence[int], spans: Sequence[tuple[int, int]]) -> list[int]:
    """For each token start offset, the index of the sentence span it falls in; a token in the white
    space between two sentences goes to the next one (it is that sentence's leading space)."""
    ends = np.array([b for _, b in spans])
    idx = np.searchsorted(ends, np.asarray(offsets, dtype=np.int64), side="right")
    return np.minimum(idx, len(spans) - 1).tolist()


def _group_mean(values: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    counts = np.bincount(groups, minlength=n)
    return np.bincount(groups, weights=values, minlength=n) / np.maximum(counts, 1)


def _group_max(values: np.ndarray, groups: np.ndarray, n: int) -> np.ndarray:
    out = np.full(n, -np.inf)
    np.maximum.at(out, groups, values)
    return out


@dataclass(frozen=True)
class TokenUncertainty:
    """The three token-uncertainty detectors of one passage (``entropy`` is None when the backend
    reports no entropies)."""

    mean_nll: DetectorScores
    max_nll: DetectorScores
    entropy: DetectorScores | None


def uncertainty_from_scored(scored: Scored, passage: str) -> TokenUncertainty:
    """Avg(-log p), Max(-log p) and Avg(H) per sentence of ``passage`` from its per-token scores (module
    docstring). A sentence that received no token of its own (the tokeniser merged it into a
    neighbour's token) is scored NaN, so that nothing is invented for it."""
    check_passage(passage)
    if len(scored.tokens) != len(scored.logprobs):
        raise ShapeError(
            f"Scored: expected one log-probability per token, got {len(scored.logprobs)} for "
            f"{len(scored.tokens)} tokens"
        )
    if not scored.tokens:
        raise DataError("token uncertainty: the model returned no tokens for a non-empty passage")
    spans = sentence_spans(passage)
    sentences = [passage[a:b] for a, b in spans]
    n = len(spans)
    groups = np.asarray(sentence_of_tokens(token_offsets(scored.tokens, passage), spans), dtype=np.int64)
    nll = -np.asarray(scored.logprobs, dtype=np.float64)
    has = np.bincount(groups, minlength=n) > 0
    mean_s = np.where(has, _group_mean(nll, groups, n), np.nan)
    max_s = np.where(has, _group_max(nll, groups, n), np.nan)
    mean_nll = DetectorScores(sentences, mean_s.tolist(), float(nll.mean()))
    max_nll = DetectorScores(sentences, max_s.tolist(), float(np.nanmean(max_s)))
    entropy = None
    if scored.entropies is not None:
        h = np.asarray(scored.entropies, dtype=np.float64)
        if h.shape != nll.shape:
            raise ShapeError(f"Scored: expected one entropy per token, got {h.size} for {nll.size} tokens")
        ent_s = np.where(has, _group_mean(h, groups, n), np.nan)
        entropy = DetectorScores(sentences, ent_s.tolist(), float(h.mean()))
    return TokenUncertainty(mean_nll, max_nll, entropy)


def _failed_uncertainty(reason: str) -> TokenUncertainty:
    f = DetectorScores.failure(reason)
    return TokenUncertainty(f, f, f)


def token_uncertainty(lm: LanguageModel, prompts: Sequence[str], passages: Sequence[str]) -> list[TokenUncertainty]:
    """Score each passage as the continuation of its prompt under ``lm`` (one ``logprobs`` call for the
    batch) and return its token-uncertainty detectors. An empty passage, a passage the backend refuses
    (:func:`batch_or_each`), or an answer that cannot be mapped onto the passage is that item's
    recorded failure."""
    if len(prompts) != len(passages):
        raise ShapeError(
            f"token_uncertainty: expected one prompt per passage, got {len(prompts)} prompts "
            f"and {len(passages)} passages"
        )
    out: list[TokenUncertainty | None] = [None] * len(passages)
    live = []
    for i, p in enumerate(passages):
        try:
            check_passage(p)
            live.append(i)
        except DataError as e:
            out[i] = _failed_uncertainty(str(e))
    scored = batch_or_each(lambda idx: lm.logprobs([prompts[i] for i in idx], [passages[i] for i in idx]), live)
    for i, s in zip(live, scored):
        try:
            if isinstance(s, NotelabError):
                raise s
            out[i] = uncertainty_from_scored(s, passages[i])
        except NotelabError as e:
            out[i] = _failed_uncertainty(f"{lm.name}: {e}")
    return out  # type: ignore[return-value]


__all__ = [
    "DetectorScores",
    "TokenUncertainty",
    "batch_or_each",
    "check_passage",
    "sentence_of_tokens",
    "token_offsets",
    "token_uncertainty",
    "uncertainty_from_scored",
]
