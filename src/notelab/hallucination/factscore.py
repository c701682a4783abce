"""FActScore-style fact checking: split a generation into atomic facts, retrieve evidence for each from a
knowledge source, judge whether the evidence supports it (Min et al. 2023, "FActScore: Fine-grained
Atomic Evaluation of Factual Precision in Long Form Text Generation", EMNLP).

For a response ``y`` with atomic facts ``A_y`` and knowledge source ``C`` (Sec. 3.1, 4.3)::

    f(y) = 1/|A_y| sum_{a in A_y} I[a is supported by C]
    FActScore(y) = gamma-penalised f(y) = f(y) * exp(1 - gamma / |A_y|)  when |A_y| < gamma, else f(y)

with ``gamma = 10`` (the length penalty of the paper's released code, which keeps a model from scoring
well by saying little). A response with no atomic fact is an abstention and is not scored.

The pieces are injected: a decomposer (one fact per sentence, or a :class:`LMDecomposer` prompting any
``LanguageModel``), a retriever (any ``search(query, k) -> passages``; ``BM25Index.search`` from
:mod:`notelab.data.retrieval`), and a support judge (:class:`LMSupport`: ``log p(" True")`` against
``log p(" False")`` after FActScore's prompt; :class:`NLISupport`: entailment by an NLI model;
:class:`LexicalSupport`: the share of the fact's content words found in the evidence).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from notelab.core.errors import ConfigError, DataError, NotelabError, ShapeError
from notelab.hallucination.detectors import DetectorScores, batch_or_each, check_passage
from notelab.hallucination.protocol import LanguageModel
from notelab.hallucination.selfcheck import LogprobVerdict, NLIModel, Verdict
from notelab.hallucination.text import parse_list, split_sentences, words

GAMMA = 10


def length_penalty(n_facts: int, gamma: float = GAMMA) -> float:
    """``exp(1 - gamma / |A|)`` when ``|A| < gamma``, else 1 (FActScore's penalty for few facts)."""
    if n_facts < 1:
        raise DataError(f"length_penalty: expected at least one atomic fact, got {n_facts}")
    return 1.0 if n_facts >= gamma else math.exp(1.0 - gamma / n_facts)


def factscore(supported: Sequence[bool], gamma: float | None = GAMMA) -> float:
    """The share of supported facts, times :func:`length_penalty` unless ``gamma`` is None."""
    if not supported:
        raise DataError("factscore: expected at least one atomic fact, got none (an abstention is not scored)")
    precision = sum(map(bool, supported)) / len(supported)
    return precision if gamma is None else precision * length_penalty(len(supported), gamma)


# --- atomic facts -----------------------------------------------------------------------------------------

Decomposer = Callable[[Sequence[str]], "list[list[str]]"]


def sentence_facts(sentences: Sequence[str]) -> list[list[str]]:
    """Each sentence is one atomic fact (the cheap decomposition)."""
    return [[s] for s in sentences]


FACT_PROMPT = (
    "Please break down the following sentence into independent facts, one per line, each starting with '- '."
    "\n\nSentence: {sentence}\nFacts:\n"
)


@dataclass(frozen=True)
class LMDecomposer:
    """Atomic facts written by a language model (FActScore Sec. 3.3 uses InstructGPT with a few-shot
    prompt), one greedy call per sentence, batched. A sentence the model returns no fact for (or
    refuses) is kept whole as its one fact, so that no claim goes unchecked."""

    lm: LanguageModel
    template: str = FACT_PROMPT
    max_new_tokens: int = 128

    def __call__(self, sentences: Sequence[str]) -> list[list[str]]:
        if not sentences:
            return []
        prompts = [self.template.format(sentence=s) for s in sentences]
        gens = batch_or_each(
            lambda b: self.lm.generate(b, n=1, temperature=0.0, max_new_tokens=self.max_new_tokens), prompts
        )
        return [
            (parse_list(g[0].text) if g and not isinstance(g, NotelabError) else []) or [s]
            for g, s in zip(gens, sentences)
        ]


# --- support judges ----------------------------------------------------------------------------------------


class HasText(Protocol):
    text: str


Retriever = Callable[[str, int], Sequence[HasText]]
# A judge scores each (fact, evidence texts) pair: (score, supported), score in [0, 1], higher = less
# supported; None when it cannot tell (an unreadable answer).
Judgement = tuple[float, bool]
Judge = Callable[[Sequence[str], Sequence[Sequence[str]]], "list[Judgement | None]"]

FACTSCORE_PROMPT = (
    "Answer the question based on the given context.\n\n{context}\n\nInput: {fact} True or False?\nOutput:"
)


@dataclass(frozen=True)
class LMSupport:
    """A language model judges each fact after FActScore's retrieve-then-ask prompt: supported when
    ``P(False) / (P(True) + P(False)) < 0.5`` (with the default :class:`LogprobVerdict`; a
    :class:`TextVerdict` reads the greedy answer instead)."""

    lm: LanguageModel
    verdict: Verdict = LogprobVerdict(" True", " False")  # noqa: B008 (frozen, so a shared default is safe)
    template: str = FACTSCORE_PROMPT

    def __call__(self, facts: Sequence[str], evidence: Sequence[Sequence[str]]) -> list[Judgement | None]:
        prompts = [
            self.template.format(context="\n\n".join(f"Text: {e}" for e in ev), fact=f)
            for f, ev in zip(facts, evidence)
        ]
        return [None if p is None else (p, p < 0.5) for p in self.verdict(self.lm, prompts)]


@dataclass(frozen=True)
class NLISupport:
    """An NLI model judges each fact (hypothesis) against each evidence passage (premise): the score is
    ``1 - max_passages P(entailment)`` under the full softmax (neutral evidence does not support), and
    the fact is supported when that entailment probability reaches ``threshold``. No evidence: unsupported."""

    nli: NLIModel
    threshold: float = 0.5

    def __call__(self, facts: Sequence[str], evidence: Sequence[Sequence[str]]) -> list[Judgement | None]:
        premises = [e for ev in evidence for e in ev]
        hypotheses = [f for f, ev in zip(facts, evidence) for _ in ev]
        p = torch.softmax(self.nli.logits(premises, hypotheses), dim=-1)[:, self.nli.entail].tolist()
        out: list[Judgement | None] = []
        at = 0
        for ev in evidence:
            best = max(p[at : at + len(ev)], default=0.0)
            at += len(ev)
            out.append((1.0 - best, best >= self.threshold))
        return out


STOPWORDS = frozenset(
    "a an the of in on at to for from by with and or is are was were be been being it its this that these those "
    "as into than then there their they he she his her has have had do does did not no".split()
)


def content_words(text: str) -> set[str]:
    """Lower-cased words of ``text`` that carry content: no stop word, no punctuation."""
    return {w for w in words(text) if w not in STOPWORDS and any(c.isalnum() for c in w)}


@dataclass(frozen=True)
class LexicalSupport:
    """Supported when at least ``threshold`` of the fact's content words occur in the evidence (score =
    1 - that share); a fact without content words is unsupported. The model-free baseline."""

    threshold: float = 0.8

    def __call__(self, facts: Sequence[str], evidence: Sequence[Sequence[str]]) -> list[Judgement | None]:
        out: list[Judgement | None] = []
        for f, ev in zip(facts, evidence):
            need = content_words(f)
            have = content_words(" ".join(ev))
            share = len(need & have) / len(need) if need else 0.0
            out.append((1.0 - share, share >= self.threshold))
        return out


# --- the check -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FactVerdict:
    """One atomic fact: the sentence it came from, the evidence it was judged on (passage texts and
    their sources), and the judgement; ``failed`` when the judge gave no readable answer."""

    fact: str
    sentence: int
    supported: bool | None
    score: float
    evidence: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    failed: str | None = None


@dataclass(frozen=True)
class FactCheck:
    """A passage checked fact by fact: the verdicts, the share supported (``precision``), the
    length-penalised FActScore, and the detector view (per sentence: the share of its judged facts
    that are unsupported; passage: ``1 - precision``)."""

    facts: list[FactVerdict]
    precision: float
    score: float
    detector: DetectorScores
    failed: str | None = None

    @classmethod
    def failure(cls, reason: str, sentences: Sequence[str] = (), facts: Sequence[FactVerdict] = ()) -> FactCheck:
        nan = float("nan")
        return cls(list(facts), nan, nan, DetectorScores.failure(reason, sentences), reason)


def _summarise(sentences: list[str], facts: list[FactVerdict], gamma: float | None) -> FactCheck:
    judged = [f for f in facts if f.supported is not None]
    if not judged:
        return FactCheck.failure(f"no fact of {len(facts)} could be judged ({facts[0].failed})", sentences, facts)
    supported = [bool(f.supported) for f in judged]
    per = []
    for i in range(len(sentences)):
        mine = [not f.supported for f in judged if f.sentence == i]
        per.append(float(np.mean(mine)) if mine else float("nan"))
    precision = sum(supported) / len(supported)
    detector = DetectorScores(sentences, per, 1.0 - precision)
    return FactCheck(facts, precision, factscore(supported, gamma), detector)


def check_facts(
    passages: Sequence[str],
    judge: Judge,
    retriever: Retriever | None = None,
    decompose: Decomposer = sentence_facts,
    k: int = 5,
    gamma: float | None = GAMMA,
    topics: Sequence[str] | None = None,
) -> list[FactCheck]:
    """Check each passage (module docstring). All sentences of the batch go to the decomposer in one call
    and all facts to the judge in one call; each fact's evidence is the top ``k`` passages the retriever
    returns for it (prefixed by its passage's topic when ``topics`` are given, as FActScore retrieves
    from the topic's article); no retriever: the judge sees no evidence (the model's own knowledge, for
    :class:`LMSupport`). An empty passage, a passage the decomposer finds no fact in, or one whose facts
    all fail to be judged is that item's recorded failure."""
    if k < 1:
        raise ConfigError(f"check_facts: expected k >= 1, got {k}")
    if topics is not None and len(topics) != len(passages):
        raise ShapeError(f"check_facts: expected one topic per passage, got {len(topics)} and {len(passages)}")
    out: list[FactCheck | None] = [None] * len(passages)
    split: dict[int, list[str]] = {}
    for i, p in enumerate(passages):
        try:
            check_passage(p)
            split[i] = split_sentences(p)
        except NotelabError as e:
            out[i] = FactCheck.failure(str(e))
    flat = [(i, j, s) for i, sents in split.items() for j, s in enumerate(sents)]
    decomposed = decompose([s for _, _, s in flat])
    if len(decomposed) != len(flat):
        raise ShapeError(f"decomposer: expected facts for {len(flat)} sentences, got {len(decomposed)}")
    facts = [(i, j, f) for (i, j, _), fs in zip(flat, decomposed) for f in fs if f.strip()]
    evidence: list[Sequence[HasText]] = []
    for i, _, f in facts:
        query = f if topics is None else f"{topics[i]} {f}"
        evidence.append(list(retriever(query, k)) if retriever is not None else [])
    judged = judge([f for _, _, f in facts], [[e.text for e in ev] for ev in evidence]) if facts else []
    if len(judged) != len(facts):
        raise ShapeError(f"judge: expected {len(facts)} judgements, got {len(judged)}")
    per_item: dict[int, list[FactVerdict]] = {i: [] for i in split}
    for (i, j, f), ev, jd in zip(facts, evidence, judged):
        texts = tuple(e.text for e in ev)
        sources = tuple(str(getattr(e, "source", "")) for e in ev)
        if jd is None:
            per_item[i].append(FactVerdict(f, j, None, float("nan"), texts, sources, "judge gave no readable answer"))
        else:
            per_item[i].append(FactVerdict(f, j, jd[1], float(jd[0]), texts, sources))
    for i, sents in split.items():
        if not per_item[i]:
            out[i] = FactCheck.failure("no atomic fact found (an abstention is not scored)", sents)
        else:
            out[i] = _summarise(sents, per_item[i], gamma)
    return out  # type: ignore[return-value]


def mean_factscore(checks: Sequence[FactCheck]) -> float:
    """FActScore of a model: the mean over its scored responses (failures and abstentions left out)."""
    scores = [c.score for c in checks if c.failed is None]
    if not scores:
        raise DataError(f"mean_factscore: expected at least one scored response, got none of {len(checks)}")
    return float(np.mean(scores))


__all__ = [
    "FACTSCORE_PROMPT",
    "FACT_PROMPT",
    "GAMMA",
    "FactCheck",
    "FactVerdict",
    "LMDecomposer",
    "LMSupport",
    "LexicalSupport",
    "NLISupport",
    "check_facts",
    "content_words",
    "factscore",
    "length_penalty",
    "mean_factscore",
    "sentence_facts",
]
