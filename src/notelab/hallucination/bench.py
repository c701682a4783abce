"""Running stdlib-facts against any :class:`LanguageModel`: answers, labels, rates, diversity, retrieval.

Shared by ``notelab hallucination bench`` and ``notelab reproduce hallucination``:

- :func:`answer_facts`: ``n`` completions of each fact's prompt, cut where the answer ends
  (:func:`notelab.hallucination.stdlib_facts.stop_text`).
- :func:`rates`: the hallucination rate (fraction of answers that do not state the fact) overall
  and per kind of question.
- :func:`distinct_n`: diversity of samples, distinct-n (Li et al. 2016, "A Diversity-Promoting
  Objective Function for Neural Conversation Models", sec. 4.2): distinct n-grams / all n-grams,
  here over whitespace-and-punctuation tokens of the samples of one prompt, averaged over prompts
  (Lee et al. 2022 report it beside factuality for factual-nucleus sampling).
- :func:`with_passages`: a code-shaped prompt with retrieved passages above it as comment lines
  (retrieval-augmented answering for a base model that reads code).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from notelab.core.errors import ConfigError
from notelab.hallucination.protocol import LanguageModel
from notelab.hallucination.stdlib_facts import KINDS, Fact, is_correct, stop_text

if TYPE_CHECKING:
    from notelab.data.retrieval import BM25Index
    from notelab.lm.sampling import FactualNucleus

_TOKEN = re.compile(r"\w+|[^\w\s]")


@dataclass(frozen=True)
class Rates:
    overall: float
    by_kind: dict[str, float]  # kinds present only
    n: int
    n_by_kind: dict[str, int]


def answer_facts(
    lm: LanguageModel,
    facts: Sequence[Fact],
    n: int = 1,
    temperature: float = 0.0,
    top_p: float | FactualNucleus = 1.0,
    max_new_tokens: int = 32,
    prompts: Sequence[str] | None = None,
    batch_size: int = 64,
) -> list[list[str]]:
    """``n`` answers per fact (greedy at temperature 0), each cut at the end of its answer. ``prompts``
    replaces the facts' own prompts (e.g. with retrieved passages above them)."""
    prompts = [f.prompt for f in facts] if prompts is None else list(prompts)
    if len(prompts) != len(facts):
        raise ConfigError(f"expected one prompt per fact, got {len(prompts)} for {len(facts)} facts")
    out: list[list[str]] = []
    for start in range(0, len(facts), batch_size):
        chunk = prompts[start : start + batch_size]
        gens = lm.generate(chunk, n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
        out += [[g.text for g in row] for row in gens]
    return [[stop_text(f, text) for text in row] for f, row in zip(facts, out)]


def wrong(facts: Sequence[Fact], answers: Sequence[Sequence[str]]) -> list[list[bool]]:
    """Per fact and answer: True when the answer does not state the fact (hallucinated)."""
    return [[not is_correct(f, a) for a in row] for f, row in zip(facts, answers)]


def rates(facts: Sequence[Fact], labels: Sequence[Sequence[bool]]) -> Rates:
    """Hallucination rate overall and per kind: the mean over facts of each fact's fraction of wrong answers."""
    per_fact = [sum(row) / len(row) for row in labels]
    by_kind, n_by_kind = {}, {}
    for kind in KINDS:
        vals = [r for f, r in zip(facts, per_fact) if f.kind == kind]
        if vals:
            by_kind[kind], n_by_kind[kind] = sum(vals) / len(vals), len(vals)
    return Rates(sum(per_fact) / max(1, len(per_fact)), by_kind, len(per_fact), n_by_kind)


def distinct_n(texts: Sequence[str], n: int = 2) -> float:
    """Distinct n-grams / all n-grams of ``texts`` (tokens: words and punctuation); 0 with no n-gram."""
    if n < 1:
        raise ConfigError(f"distinct_n: expected n >= 1, got {n}")
    grams = [tuple(t[i : i + n]) for t in (_TOKEN.findall(x) for x in texts) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def mean_distinct_n(groups: Sequence[Sequence[str]], n: int = 2) -> float:
    """:func:`distinct_n` of each prompt's samples, averaged over the prompts that have an n-gram."""
    values = [distinct_n(g, n) for g in groups]
    values = [v for v, g in zip(values, groups) if any(len(_TOKEN.findall(x)) >= n for x in g)]
    return sum(values) / len(values) if values else 0.0


def with_passages(prompt: str, passages: Sequence[str]) -> str:
    """``prompt`` with each passage above it as one ``#`` comment line (code-shaped, so a model
    pre-trained on source code reads them as it read comments)."""
    lines = ["# " + " ".join(p.split()) for p in passages]
    return "\n".join(lines) + ("\n" if lines else "") + prompt


def retrieval_prompts(index: BM25Index, facts: Sequence[Fact], k: int = 1) -> list[str]:
    """Each fact's prompt with the ``k`` passages BM25 finds for its question (the question names the
    function; the answer is never in the query)."""
    return [with_passages(f.prompt, [p.text for p in index.search(f.question, k)]) for f in facts]


__all__ = [
    "Rates",
    "answer_facts",
    "distinct_n",
    "mean_distinct_n",
    "rates",
    "retrieval_prompts",
    "with_passages",
    "wrong",
]
