"""Sentence splitting, token -> sentence mapping and the token-uncertainty detectors, computed by hand.

Also holds ``FakeLM``, the deterministic test double of the LanguageModel protocol that the other
hallucination detector / mitigation tests import."""

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from notelab.core.errors import ConfigError, ShapeError
from notelab.hallucination.detectors import (
    DetectorScores,
    batch_or_each,
    sentence_of_tokens,
    token_offsets,
    token_uncertainty,
    uncertainty_from_scored,
)
from notelab.hallucination.protocol import Generation, LanguageModel, Scored
from notelab.hallucination.text import ngrams, sentence_spans, split_sentences, words


def pieces(text: str) -> list[str]:
    """The fake's tokens: each word with the white space before it."""
    return re.findall(r"\s*\S+|\s+$", text)


@dataclass
class FakeLM:
    """``reply(prompt, i)`` is the i-th sample's text; ``token_logprob(prompt, context, token)`` the
    log-probability of a token after the prompt and the continuation's earlier text."""

    reply: Callable[[str, int], str] = lambda prompt, i: ""
    token_logprob: Callable[[str, str, str], float] = lambda prompt, context, token: -1.0
    entropy: Callable[[str], float] | None = None
    refuse: Callable[[str], bool] = lambda prompt: False  # a batch holding such a prompt raises, as a backend
    name: str = "fake"
    prompts_seen: list = field(default_factory=list)

    def _check(self, prompts):
        bad = [i for i, p in enumerate(prompts) if self.refuse(p)]
        if bad:
            raise ShapeError(f"item {bad[0]}: expected a prompt within the context, got a longer one")

    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=64):
        self._check(prompts)
        self.prompts_seen.extend(prompts)
        self.top_p_seen = top_p
        return [[Generation(self.reply(p, 0 if temperature == 0 else i)) for i in range(n)] for p in prompts]

    def logprobs(self, prompts, continuations):
        self._check(prompts)
        out = []
        for p, c in zip(prompts, continuations):
            toks = pieces(c)
            lps = tuple(self.token_logprob(p, "".join(toks[:j]), t) for j, t in enumerate(toks))
            ents = None if self.entropy is None else tuple(self.entropy(t) for t in toks)
            out.append(Scored(tuple(toks), lps, ents))
        return out


def test_fake_implements_the_protocol():
    assert isinstance(FakeLM(), LanguageModel)


def test_sentence_split_keeps_abbreviations_initials_and_dotted_names():
    text = "Guido van Rossum created Python.  It came out in 1991! Is it e.g. fun? Ask J. Smith.\n\nos.path.join joins"
    assert split_sentences(text) == [
        "Guido van Rossum created Python.",
        "It came out in 1991!",
        "Is it e.g. fun?",
        "Ask J. Smith.",
        "os.path.join joins",
    ]
    for (a, b), s in zip(sentence_spans(text), split_sentences(text)):
        assert text[a:b] == s
    assert split_sentences("  \n ") == []


def test_words_and_padded_ngrams():
    assert words("Python's os.path.join(a) isn't 3.5") == [
        "python", "'s", "os.path.join", "(", "a", ")", "is", "n't", "3.5"
    ]  # fmt: skip
    assert ngrams(["a", "b"], 3) == [("<s>", "<s>", "a"), ("<s>", "a", "b")]
    assert ngrams(["a", "b"], 1) == [("a",), ("b",)]
    with pytest.raises(ConfigError, match="n-gram order"):
        ngrams(["a"], 0)


def test_tokens_map_to_their_sentences_by_offset():
    text = "One two. Three four five."
    toks = ["One", " two", ".", " Three", " four", " five", "."]
    offs = token_offsets(toks, text)
    assert offs == [0, 4, 7, 9, 15, 20, 24]
    assert sentence_of_tokens(offs, sentence_spans(text)) == [0, 0, 0, 1, 1, 1, 1]
    # a backend that shows spaces as "Ġ" (byte-level BPE) still maps by the token's text
    bpe = ["One", "Ġtwo", ".", "ĠThree", "Ġfour", "Ġfive", "."]
    assert sentence_of_tokens(token_offsets(bpe, text), sentence_spans(text)) == [0, 0, 0, 1, 1, 1, 1]


def test_token_uncertainty_by_hand():
    text = "One two. Three four five."
    toks = ("One", " two", ".", " Three", " four", " five", ".")
    lps = (-1.0, -3.0, -0.5, -2.0, -0.1, -4.0, -0.3)
    ents = (1.0, 2.0, 3.0, 0.5, 0.5, 0.5, 0.5)
    u = uncertainty_from_scored(Scored(toks, lps, ents), text)
    assert u.mean_nll.sentences == ["One two.", "Three four five."]
    assert u.mean_nll.sentence_scores == pytest.approx([4.5 / 3, 6.4 / 4])
    assert u.max_nll.sentence_scores == pytest.approx([3.0, 4.0])
    assert u.entropy.sentence_scores == pytest.approx([2.0, 0.5])
    assert u.mean_nll.passage_score == pytest.approx(10.9 / 7)
    assert u.max_nll.passage_score == pytest.approx(3.5)
    assert u.entropy.passage_score == pytest.approx(8.0 / 7)
    assert uncertainty_from_scored(Scored(toks, lps), text).entropy is None
    with pytest.raises(ShapeError, match="one log-probability per token"):
        uncertainty_from_scored(Scored(toks, lps[:-1]), text)


def test_token_uncertainty_through_a_model_records_bad_items():
    # the model is sure of "cat" and unsure of "dog": the sentence with "dog" scores higher
    lm = FakeLM(token_logprob=lambda p, ctx, tok: -5.0 if "dog" in tok else -0.2, entropy=lambda tok: len(tok))
    passages = ["A cat sat. A dog sat.", "", "A cat."]
    out = token_uncertainty(lm, ["Q:"] * 3, passages)
    first = out[0]
    assert first.mean_nll.sentence_scores[1] > first.mean_nll.sentence_scores[0]
    assert first.max_nll.sentence_scores == pytest.approx([0.2, 5.0])
    assert out[1].mean_nll.failed and "non-empty" in out[1].mean_nll.failed
    assert math.isnan(out[1].max_nll.passage_score)
    assert out[2].mean_nll.failed is None and out[2].mean_nll.passage_score == pytest.approx(0.2)
    with pytest.raises(ShapeError, match="one prompt per passage"):
        token_uncertainty(lm, ["Q:"], passages)


def test_detector_scores_check_their_lengths():
    with pytest.raises(ShapeError, match="one score per sentence"):
        DetectorScores(["a", "b"], [1.0], 1.0)
    f = DetectorScores.failure("why")
    assert f.failed == "why" and np.isnan(f.passage_score)


def test_token_uncertainty_on_a_real_tokenizer():
    """A tiny notelab Llama through its backend: byte-level BPE pieces (split words, a multi-byte
    character) land in the right sentence, and the scores are the per-sentence means of its log-probs."""
    backends = pytest.importorskip("notelab.hallucination.backends")
    import torch

    from notelab.data.tokenizer import Tokenizer
    from notelab.lm.config import LlamaConfig
    from notelab.lm.model import Llama

    tok = Tokenizer.train(["Rome is the capital of Italy. Paris is the capital of France."] * 20, vocab_size=300)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=tok.vocab_size, dim=32, n_layers=1, n_heads=2, max_seq_len=128))
    lm = backends.NotelabLM(model, tok)
    passage = " Rome is the capital of Italy. Paris is in \u2603 Spain."
    (scored,) = lm.logprobs(["Q:"], [passage])
    assert "".join(scored.tokens) == passage
    starts = np.cumsum([0] + [len(t) for t in scored.tokens[:-1]])
    first = starts < passage.index("Paris") - 1  # tokens of the first sentence (and the leading space)
    (u,) = token_uncertainty(lm, ["Q:"], [passage])
    nll = -np.array(scored.logprobs)
    assert u.mean_nll.sentence_scores == pytest.approx([nll[first].mean(), nll[~first].mean()])
    assert u.max_nll.sentence_scores == pytest.approx([nll[first].max(), nll[~first].max()])
    assert u.entropy.sentence_scores == pytest.approx(
        [np.mean(np.array(scored.entropies)[first]), np.mean(np.array(scored.entropies)[~first])]
    )


def test_one_refused_item_costs_only_itself():
    calls = []

    def call(batch):
        calls.append(list(batch))
        if "bad" in batch:
            raise ShapeError("too long")
        return [x.upper() for x in batch]

    out = batch_or_each(call, ["a", "bad", "c"])
    assert out[0] == "A" and out[2] == "C" and isinstance(out[1], ShapeError)
    assert calls == [["a", "bad", "c"], ["a"], ["bad"], ["c"]]  # one batch call, then each alone
    assert batch_or_each(call, ["a", "c"]) == ["A", "C"] and calls[-1] == ["a", "c"]
    assert isinstance(batch_or_each(lambda b: [], ["a"])[0], ShapeError)  # wrong number of results
    lm = FakeLM(refuse=lambda p: p == "LONG")
    ok, refused = token_uncertainty(lm, ["Q:", "LONG"], ["A cat sat.", "A dog sat."])
    assert ok.mean_nll.failed is None and ok.mean_nll.passage_score == pytest.approx(1.0)
    assert refused.max_nll.failed == "fake: item 0: expected a prompt within the context, got a longer one"
