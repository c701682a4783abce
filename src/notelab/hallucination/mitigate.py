"""Mitigations over any :class:`~notelab.hallucination.protocol.LanguageModel`.

- Retrieval-augmented answering (Lewis et al. 2020, "Retrieval-Augmented Generation for
  Knowledge-Intensive NLP Tasks"; as a prompt, Ram et al. 2023, "In-Context Retrieval-Augmented Language
  Models"): the top ``k`` passages a retriever returns for the question are put before it in the prompt.
  Without a retriever the same function answers closed-book, the baseline it is compared with.
- Chain-of-verification (Dhuliawala et al. 2023, "Chain-of-Verification Reduces Hallucination in Large
  Language Models"), the "factored" variant of its Sec. 3.3: (1) draft a baseline response, (2) plan
  verification questions from the query and the draft, (3) answer each question in its own prompt,
  without the draft, so the draft's errors are not copied, (4) write the final response from the draft
  and the question/answer pairs. Step (3) may itself be retrieval-augmented.
- Factual-nucleus sampling (Lee et al. 2022) lives in :class:`notelab.lm.sampling.FactualNucleus`; every
  function here passes ``top_p`` (a float or that schedule) through to ``LanguageModel.generate``.

Each stage is one batched ``generate`` call over all items. An item whose model output is empty is a
recorded failure (``failed``), never an exception for the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from notelab.core.errors import ConfigError, NotelabError
from notelab.hallucination.detectors import batch_or_each
from notelab.hallucination.factscore import Retriever
from notelab.hallucination.protocol import Generation, LanguageModel
from notelab.hallucination.text import parse_list

if TYPE_CHECKING:
    from notelab.lm.sampling import FactualNucleus

RAG_PROMPT = "Answer the question using the passages below.\n\n{context}\n\nQuestion: {question}\nAnswer:"
CLOSED_BOOK_PROMPT = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class Decoding:
    """How a stage samples: ``temperature == 0`` is greedy; ``top_p`` a float or a FactualNucleus."""

    n: int = 1
    temperature: float = 0.0
    top_p: float | FactualNucleus = 1.0
    max_new_tokens: int = 64

    def __post_init__(self) -> None:
        if self.n < 1 or self.temperature < 0 or self.max_new_tokens < 1:
            raise ConfigError(
                f"Decoding: expected n >= 1, temperature >= 0 and max_new_tokens >= 1, got n={self.n}, "
                f"temperature={self.temperature}, max_new_tokens={self.max_new_tokens}"
            )


def _generate(
    lm: LanguageModel, prompts: Sequence[str], decoding: Decoding
) -> list[tuple[tuple[str, ...], str | None]]:
    """Per prompt: the stripped texts of ``decoding.n`` samples, and why there are none when the model
    refused that prompt (:func:`~notelab.hallucination.detectors.batch_or_each`); one call when all go."""
    d = decoding

    def call(batch: list[str]) -> list[list[Generation]]:
        return lm.generate(batch, n=d.n, temperature=d.temperature, top_p=d.top_p, max_new_tokens=d.max_new_tokens)

    return [
        ((), f"{lm.name}: {r}") if isinstance(r, NotelabError) else (tuple(g.text.strip() for g in r), None)
        for r in batch_or_each(call, prompts)
    ]


@dataclass(frozen=True)
class Answer:
    """A question's sampled answers and the passages (texts, sources) they were given."""

    question: str
    answers: tuple[str, ...]
    evidence: tuple[str, ...] = ()
    sources: tuple[str, ...] = ()
    failed: str | None = None

    @property
    def text(self) -> str:
        """The first answer (the greedy one when decoding is greedy)."""
        return self.answers[0] if self.answers else ""


def answer_questions(
    lm: LanguageModel,
    questions: Sequence[str],
    retriever: Retriever | None = None,
    k: int = 5,
    decoding: Decoding = Decoding(),  # noqa: B008 (frozen, so a shared default is safe)
    template: str | None = None,
) -> list[Answer]:
    """Answer each question, with the top ``k`` retrieved passages in the prompt (``RAG_PROMPT``) or
    closed-book when ``retriever`` is None (``CLOSED_BOOK_PROMPT``); ``template`` overrides either (fields
    ``{context}`` and ``{question}``). An empty question, or answers that are all empty, is that item's
    recorded failure."""
    if k < 1:
        raise ConfigError(f"answer_questions: expected k >= 1, got {k}")
    template = template or (CLOSED_BOOK_PROMPT if retriever is None else RAG_PROMPT)
    out: list[Answer | None] = [None] * len(questions)
    live, prompts, found = [], [], []
    for i, q in enumerate(questions):
        if not isinstance(q, str) or not q.strip():
            out[i] = Answer(str(q), (), failed=f"expected a non-empty question, got {q!r}")
            continue
        passages = list(retriever(q, k)) if retriever is not None else []
        context = "\n\n".join(p.text for p in passages)
        live.append(i)
        prompts.append(template.format(context=context, question=q.strip()))
        found.append(passages)
    for i, (texts, error), passages in zip(live, _generate(lm, prompts, decoding), found):
        failed = error or (None if any(texts) else f"{lm.name} returned empty text for all {len(texts)} samples")
        evidence = tuple(p.text for p in passages)
        sources = tuple(str(getattr(p, "source", "")) for p in passages)
        out[i] = Answer(questions[i], texts, evidence, sources, failed)
    return out  # type: ignore[return-value]


@dataclass(frozen=True)
class CoVeTemplates:
    """The four prompts of chain-of-verification (fields in braces)."""

    draft: str = CLOSED_BOOK_PROMPT
    plan: str = (
        "Question: {question}\nDraft answer: {draft}\n\n"
        "Write up to {m} short questions, one per line, that check the facts in the draft answer.\n"
    )
    revise: str = (
        "Question: {question}\nDraft answer: {draft}\n\nVerification:\n{checks}\n\n"
        "Using the verification, write a corrected answer to the question.\nAnswer:"
    )


@dataclass(frozen=True)
class Verified:
    """One chain-of-verification run: the draft, the verification questions and their independent
    answers, the final answer (the draft when a later stage failed, with ``failed`` saying which)."""

    question: str
    draft: str
    checks: tuple[tuple[str, str], ...]
    final: str
    failed: str | None = None


def plan_questions(text: str, m: int) -> list[str]:
    """Verification questions from a planning answer: its list items, only those ending in '?' when any
    do (a model may write a preamble), at most ``m``."""
    items = parse_list(text)
    asked = [q for q in items if q.endswith("?")]
    return (asked or items)[:m]


def chain_of_verification(
    lm: LanguageModel,
    questions: Sequence[str],
    max_checks: int = 3,
    retriever: Retriever | None = None,
    k: int = 3,
    decoding: Decoding = Decoding(),  # noqa: B008 (frozen, so a shared default is safe)
    templates: CoVeTemplates = CoVeTemplates(),  # noqa: B008
) -> list[Verified]:
    """Factored chain-of-verification (module docstring) for each question. The draft is sampled with
    ``decoding`` (so factual-nucleus sampling applies to it); planning, verification and revision are
    greedy. Verification questions are answered closed-book, or from the top ``k`` passages of
    ``retriever``."""
    if max_checks < 1:
        raise ConfigError(f"chain_of_verification: expected max_checks >= 1, got {max_checks}")
    greedy = Decoding(n=1, temperature=0.0, max_new_tokens=decoding.max_new_tokens)
    drafts = answer_questions(lm, questions, None, decoding=replace(decoding, n=1), template=templates.draft)
    out: list[Verified | None] = [None] * len(questions)
    live = []
    for i, d in enumerate(drafts):
        if d.failed:
            out[i] = Verified(str(questions[i]), d.text, (), d.text, f"draft: {d.failed}")
        else:
            live.append(i)
    plans = _generate(
        lm, [templates.plan.format(question=questions[i], draft=drafts[i].text, m=max_checks) for i in live], greedy
    )
    asked = {i: plan_questions(texts[0] if texts else "", max_checks) for i, (texts, _) in zip(live, plans)}
    flat = [(i, q) for i in live for q in asked[i]]
    replies = answer_questions(lm, [q for _, q in flat], retriever, k, decoding=greedy)
    checks: dict[int, list[tuple[str, str]]] = {i: [] for i in live}
    for (i, q), r in zip(flat, replies):
        checks[i].append((q, r.text))
    revisable = [i for i in live if checks[i]]
    for i in live:
        if not checks[i]:
            out[i] = Verified(questions[i], drafts[i].text, (), drafts[i].text, "plan: no verification question")
    finals = _generate(
        lm,
        [
            templates.revise.format(
                question=questions[i],
                draft=drafts[i].text,
                checks="\n".join(f"Q: {q}\nA: {a}" for q, a in checks[i]),
            )
            for i in revisable
        ],
        greedy,
    )
    for i, (texts, error) in zip(revisable, finals):
        ok = bool(texts and texts[0])
        final = texts[0] if ok else drafts[i].text
        failed = None if ok else f"revise: {error or 'empty text'}, the draft is kept"
        out[i] = Verified(questions[i], drafts[i].text, tuple(checks[i]), final, failed)
    return out  # type: ignore[return-value]


__all__ = [
    "CLOSED_BOOK_PROMPT",
    "RAG_PROMPT",
    "Answer",
    "CoVeTemplates",
    "Decoding",
    "Verified",
    "answer_questions",
    "chain_of_verification",
    "plan_questions",
]
