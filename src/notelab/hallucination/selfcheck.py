"""SelfCheckGPT: a sentence the model knows is consistent with other samples it draws for the same
prompt; a hallucinated one is not (Manakul, Liusie & Gales 2023, "SelfCheckGPT: Zero-Resource
Black-Box Hallucination Detection for Generative Large Language Models", EMNLP).

Given the passage ``R`` (sentences ``r_1..r_I``) and ``N`` stochastic samples ``S^1..S^N``:

- n-gram (Sec. 5.3): an n-gram model fitted by maximum likelihood (no smoothing by default) on ``R``
  and all samples; token ``j`` of sentence ``i`` has ``p~_ij`` under it and
  ``Avg(-log p)_i = -1/J sum_j log p~_ij``, ``Max(-log p)_i = max_j -log p~_ij``.
- prompt (Sec. 5.5): an LLM is asked "is the sentence supported by the context?" with each sample as
  the context; ``x_i^n`` = 0 for Yes, 1 for No (0.5 when the answer is neither) and
  ``S_prompt(i) = 1/N sum_n x_i^n``. With log-probabilities the hard answer becomes
  ``P(No) / (P(Yes) + P(No))``.
- NLI (Sec. 5.4): ``S_NLI(i) = 1/N sum_n P(contradict | r_i, S^n)``, the probability normalised over
  the entailment and contradiction classes only, ``exp(z_c) / (exp(z_e) + exp(z_c))``.

The passage score is the mean of the sentence scores (for n-gram: the mean -log p over all tokens and
the mean of the sentence maxima, the paper's document level).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from notelab.core.errors import ConfigError, DataError, NotelabError, ShapeError
from notelab.hallucination.detectors import DetectorScores, batch_or_each, check_passage
from notelab.hallucination.protocol import LanguageModel, Scored
from notelab.hallucination.text import ngrams, split_sentences, words

if TYPE_CHECKING:
    from notelab.lm.sampling import FactualNucleus

UNK = "<unk>"


def _tokens(text: str) -> list[str]:
    return words(text, lowercase=False)


# --- the responses SelfCheck compares ---------------------------------------------------------------------


@dataclass(frozen=True)
class Responses:
    """What SelfCheckGPT checks (Sec. 6): the response ``passage`` (greedy) and ``samples`` drawn for the
    same prompt."""

    prompt: str
    passage: str
    samples: tuple[str, ...]


def sample_responses(
    lm: LanguageModel,
    prompts: Sequence[str],
    n: int = 20,
    temperature: float = 1.0,
    top_p: float | FactualNucleus = 1.0,
    max_new_tokens: int = 64,
) -> list[Responses]:
    """For each prompt, the greedy response and ``n`` samples at ``temperature`` and ``top_p`` (the paper:
    N = 20, temperature 1.0); two batched ``generate`` calls."""
    if n < 1 or temperature <= 0:
        raise ConfigError(
            f"sample_responses: expected n >= 1 and temperature > 0, got n={n}, temperature={temperature}"
        )
    greedy = lm.generate(list(prompts), n=1, temperature=0.0, max_new_tokens=max_new_tokens)
    drawn = lm.generate(list(prompts), n=n, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)
    if len(greedy) != len(prompts) or len(drawn) != len(prompts):
        raise ShapeError(f"{lm.name}.generate: expected {len(prompts)} results, got {len(greedy)} and {len(drawn)}")
    return [
        Responses(p, g[0].text.strip() if g else "", tuple(x.text.strip() for x in d))
        for p, g, d in zip(prompts, greedy, drawn)
    ]


# --- n-gram -------------------------------------------------------------------------------------------


def ngram_counts(
    texts: Sequence[str],
    n: int,
    tokenize: Callable[[str], list[str]] = _tokens,
    split: Callable[[str], list[str]] = split_sentences,
    lowercase: bool = True,
) -> Counter:
    """Counts of the (left-padded) n-grams of every sentence of every text; the key ``UNK`` is present
    with count 0, as in SelfCheckGPT, so that it takes part in the vocabulary size."""
    counts: Counter = Counter({UNK: 0})
    for text in texts:
        for sentence in split(text):
            toks = tokenize(sentence)
            counts.update(ngrams([t.lower() for t in toks] if lowercase else toks, n))
    return counts


def ngram_logprobs(sentence_tokens: Sequence[str], counts: Counter, n: int, k: float = 0.0) -> np.ndarray:
    """``log p~(g)`` of each n-gram of one sentence, ``p~(g) = (c(g) + k) / (sum c + k V)`` with ``V`` the
    number of distinct n-grams plus ``UNK``; an unseen n-gram is scored as ``UNK`` (``-inf`` when k = 0)."""
    total = sum(counts.values())
    denom = total + k * len(counts)
    out = np.empty(len(sentence_tokens))
    with np.errstate(divide="ignore"):
        for j, g in enumerate(ngrams(sentence_tokens, n)):
            out[j] = np.log((counts.get(g, counts[UNK]) + k) / denom)
    return out


@dataclass(frozen=True)
class NgramScores:
    """SelfCheck n-gram's two detectors of one passage."""

    avg: DetectorScores  # Avg(-log p)
    max: DetectorScores  # Max(-log p)


def selfcheck_ngram(
    passage: str,
    samples: Sequence[str],
    sentences: Sequence[str] | None = None,
    n: int = 1,
    lowercase: bool = True,
    k: float = 0.0,
    tokenize: Callable[[str], list[str]] = _tokens,
    split: Callable[[str], list[str]] = split_sentences,
) -> NgramScores:
    """SelfCheck n-gram (module docstring) of ``sentences`` (default: ``split(passage)``), the model fitted
    on ``passage`` and ``samples``. ``tokenize`` / ``split`` are injectable so that the package's spaCy
    pipeline can be used on both sides of a comparison."""
    check_passage(passage)
    if n < 1:
        raise ConfigError(f"selfcheck_ngram: expected n >= 1, got {n}")
    sentences = list(split(passage) if sentences is None else sentences)
    counts = ngram_counts([passage, *samples], n, tokenize, split, lowercase)
    per_sentence = []
    for s in sentences:
        toks = tokenize(s)
        if not toks:
            raise DataError(f"selfcheck_ngram: sentence {s!r} has no tokens")
        per_sentence.append(ngram_logprobs([t.lower() for t in toks] if lowercase else toks, counts, n, k))
    avg = [float(-lp.mean()) for lp in per_sentence]
    mx = [float(-lp.min()) for lp in per_sentence]
    doc = float(-np.concatenate(per_sentence).mean())
    return NgramScores(
        DetectorScores(sentences, avg, doc),
        DetectorScores(sentences, mx, float(np.mean(mx))),
    )


# --- reading a judge's Yes / No ---------------------------------------------------------------------------


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


@dataclass(frozen=True)
class LogprobVerdict:
    """P(negative answer) = ``p(neg) / (p(pos) + p(neg)) = sigmoid(log p(neg) - log p(pos))``, each answer
    scored as the continuation of the prompt (two ``logprobs`` rows per prompt, one call); None for a
    prompt the model refuses or scores non-finite."""

    positive: str = " Yes"
    negative: str = " No"

    def __call__(self, lm: LanguageModel, prompts: Sequence[str]) -> list[float | None]:
        if not prompts:
            return []

        def both(batch: list[str]) -> list[tuple[Scored, Scored]]:
            scored = lm.logprobs([p for p in batch for _ in (0, 1)], [self.positive, self.negative] * len(batch))
            return list(zip(scored[0::2], scored[1::2])) if len(scored) == 2 * len(batch) else scored

        out: list[float | None] = []
        for r in batch_or_each(both, prompts):
            ok = not isinstance(r, NotelabError) and all(x.tokens and math.isfinite(x.total) for x in r)
            out.append(_sigmoid(r[1].total - r[0].total) if ok else None)
        return out


@dataclass(frozen=True)
class TextVerdict:
    """The judge's greedy answer read as text: first word ``positive`` -> 0, ``negative`` -> 1, anything
    else (empty, garbage, a prompt the model refuses) -> None (SelfCheckGPT-Prompt maps it to 0.5)."""

    positive: str = "yes"
    negative: str = "no"
    max_new_tokens: int = 5

    def __call__(self, lm: LanguageModel, prompts: Sequence[str]) -> list[float | None]:
        if not prompts:
            return []
        gens = batch_or_each(
            lambda batch: lm.generate(batch, n=1, temperature=0.0, max_new_tokens=self.max_new_tokens), prompts
        )
        return [
            None if isinstance(g, NotelabError) or not g else parse_answer(g[0].text, self.positive, self.negative)
            for g in gens
        ]


def parse_answer(text: str, positive: str, negative: str) -> float | None:
    """0.0 when the first word of ``text`` is ``positive``, 1.0 when it is ``negative`` (case-insensitive),
    else None."""
    first = next(iter(words(text)), "")
    return 0.0 if first == positive.lower() else 1.0 if first == negative.lower() else None


Verdict = Callable[[LanguageModel, Sequence[str]], "list[float | None]"]

SELFCHECK_PROMPT = (
    "Context: {context}\n\nSentence: {sentence}\n\n"
    "Is the sentence supported by the context above? Answer Yes or No.\n\nAnswer:"
)


def selfcheck_prompt(
    judge: LanguageModel,
    passage: str,
    samples: Sequence[str],
    sentences: Sequence[str] | None = None,
    verdict: Verdict = LogprobVerdict(),  # noqa: B008 (frozen, so a shared default is safe)
    template: str = SELFCHECK_PROMPT,
) -> DetectorScores:
    """SelfCheck-Prompt (module docstring): one judge call for all ``sentences x samples``; an answer
    that is neither Yes nor No counts 0.5; when no answer at all can be read the item is a recorded
    failure (``failed``) rather than a column of 0.5s."""
    check_passage(passage)
    if not samples:
        raise DataError("selfcheck_prompt: expected at least one sample, got none")
    sentences = list(split_sentences(passage) if sentences is None else sentences)
    flat = [s.replace("\n", " ") for s in samples]  # SelfCheckGPT: one-line contexts read better
    prompts = [template.format(context=c, sentence=s) for s in sentences for c in flat]
    answers = verdict(judge, prompts)
    if all(a is None for a in answers):
        return DetectorScores.failure(
            f"judge {judge.name!r} gave no readable Yes/No answer to any of {len(prompts)} prompts", sentences
        )
    x = np.array([0.5 if a is None else a for a in answers]).reshape(len(sentences), len(samples))
    per = x.mean(axis=1)
    return DetectorScores(sentences, per.tolist(), float(per.mean()))


# --- NLI --------------------------------------------------------------------------------------------------


def label_index(id2label: dict, prefix: str) -> int:
    """The class index whose label starts with ``prefix`` (case-insensitive), from a model config's
    ``id2label``; a model whose labels do not name the class is refused."""
    hits = [int(i) for i, name in id2label.items() if str(name).lower().startswith(prefix)]
    if len(hits) != 1:
        raise ConfigError(
            f"NLI model: expected exactly one label starting with {prefix!r} in config id2label, "
            f"got {sorted(map(str, id2label.values()))}"
        )
    return hits[0]


def contradiction_prob(logits: torch.Tensor, entail: int, contradict: int) -> torch.Tensor:
    """``P(contradict)`` normalised over entailment and contradiction only (SelfCheckGPT's NLI score)."""
    return torch.softmax(logits[:, [entail, contradict]].float(), dim=-1)[:, 1]


class NLIModel:
    """A sequence-pair classifier (transformers ``AutoModelForSequenceClassification`` + its tokenizer)
    loaded from a local folder; the entailment / contradiction classes are read from its config."""

    def __init__(self, model: torch.nn.Module, tokenizer: object, batch_size: int = 16, max_length: int = 512):
        id2label = model.config.id2label
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.entail = label_index(id2label, "entail")
        self.contradict = label_index(id2label, "contradict")
        self.batch_size = batch_size
        self.max_length = max_length

    @classmethod
    def from_folder(cls, path: str | Path, device: str | torch.device = "cpu", **kwargs: int) -> NLIModel:
        """Load from a local folder (never from a hub)."""
        path = Path(path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"NLI model: expected a folder with config.json, got {str(path)!r}")
        try:
            from transformers import AutoModelForSequenceClassification, AutoTokenizer
        except ImportError as e:
            raise ConfigError("NLI model: expected the transformers package installed, got none") from e

        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True).to(device)
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        return cls(model, tokenizer, **kwargs)

    @torch.no_grad()
    def logits(self, first: Sequence[str], second: Sequence[str]) -> torch.Tensor:
        """Class logits ``(N, n_labels)`` of each text pair, in batches."""
        if len(first) != len(second):
            raise ShapeError(f"NLI: expected as many first as second texts, got {len(first)} and {len(second)}")
        device = next(self.model.parameters()).device
        out = []
        for i in range(0, len(first), self.batch_size):
            enc = self.tokenizer(
                list(first[i : i + self.batch_size]),
                list(second[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            ).to(device)
            out.append(self.model(**enc).logits.float().cpu())
        n_labels = len(self.model.config.id2label)
        return torch.cat(out) if out else torch.empty(0, n_labels)


def selfcheck_nli(
    nli: NLIModel, passage: str, samples: Sequence[str], sentences: Sequence[str] | None = None
) -> DetectorScores:
    """SelfCheck-NLI (module docstring): each pair is (sentence, sample), in that order, as in
    SelfCheckGPT."""
    check_passage(passage)
    if not samples:
        raise DataError("selfcheck_nli: expected at least one sample, got none")
    sentences = list(split_sentences(passage) if sentences is None else sentences)
    first = [s for s in sentences for _ in samples]
    second = [c for _ in sentences for c in samples]
    p = contradiction_prob(nli.logits(first, second), nli.entail, nli.contradict)
    per = p.reshape(len(sentences), len(samples)).mean(dim=1).double().numpy()
    return DetectorScores(sentences, per.tolist(), float(per.mean()))


__all__ = [
    "SELFCHECK_PROMPT",
    "LogprobVerdict",
    "NLIModel",
    "NgramScores",
    "Responses",
    "TextVerdict",
    "contradiction_prob",
    "label_index",
    "ngram_counts",
    "ngram_logprobs",
    "parse_answer",
    "sample_responses",
    "selfcheck_ngram",
    "selfcheck_nli",
    "selfcheck_prompt",
]
