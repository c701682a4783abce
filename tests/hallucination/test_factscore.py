"""FActScore-style checking: the length penalty by value, support fed by BM25 retrieval over a toy
knowledge base (lexical, language-model and NLI judges), decomposition, and recorded failures."""

import json
import math

import pytest
import torch
from test_detectors import FakeLM

from notelab.core.errors import ConfigError, DataError
from notelab.hallucination.factscore import (
    LexicalSupport,
    LMDecomposer,
    LMSupport,
    check_facts,
    content_words,
    factscore,
    length_penalty,
    mean_factscore,
)
from notelab.hallucination.selfcheck import TextVerdict
from notelab.hallucination.text import parse_list

KB = [
    "Guido van Rossum created the Python programming language, first released in 1991.",
    "The os.path.join function joins one or more path components.",
    "The json module encodes and decodes JSON; json.dumps returns a string.",
    "Rome is the capital of Italy and lies on the river Tiber.",
]


def test_length_penalty_values():
    assert length_penalty(10) == 1.0 and length_penalty(25) == 1.0
    assert length_penalty(5) == pytest.approx(math.exp(-1.0))
    assert length_penalty(1) == pytest.approx(math.exp(-9.0))
    assert length_penalty(4, gamma=2) == 1.0
    assert factscore([True, True, False, True]) == pytest.approx(0.75 * math.exp(1 - 10 / 4))
    assert factscore([True, False] * 6) == pytest.approx(0.5)
    assert factscore([True, False], gamma=None) == 0.5
    with pytest.raises(DataError, match="abstention"):
        factscore([])
    with pytest.raises(DataError, match="at least one atomic fact"):
        length_penalty(0)


@pytest.fixture
def index():
    retrieval = pytest.importorskip("notelab.data.retrieval")
    return retrieval.BM25Index.from_texts(KB, sources=[f"kb:{i}" for i in range(len(KB))])


def test_lexical_support_from_retrieval(index):
    passage = "Guido van Rossum created Python. Rome is the capital of France."
    (check,) = check_facts([passage], LexicalSupport(), index.search, k=1, gamma=None)
    first, second = check.facts
    assert first.supported and first.sources == ("kb:0",)
    assert not second.supported and second.sources == ("kb:3",)  # "france" is nowhere in the evidence
    assert second.score == pytest.approx(1 / 3)  # of rome, capital, france: france is missing
    assert check.precision == 0.5 and check.score == 0.5
    assert check.detector.sentence_scores == [0.0, 1.0] and check.detector.passage_score == 0.5
    # the penalty: 2 facts < gamma = 10
    (penalised,) = check_facts([passage], LexicalSupport(), index.search, k=1)
    assert penalised.score == pytest.approx(0.5 * math.exp(1 - 10 / 2))


def test_content_words_drop_stopwords_and_punctuation():
    assert content_words("Rome is the capital of France.") == {"rome", "capital", "france"}


def test_lm_judge_reads_the_retrieved_evidence(index):
    """A judge that answers True exactly when the fact's last word is in the context: support now
    depends on what BM25 retrieved, and an empty knowledge answer is unsupported."""

    def lp(prompt, context, token):
        ctx, fact = prompt.split("Input: ")[0], prompt.split("Input: ")[1].split(" True or False?")[0]
        last = fact.rstrip(".").split()[-1]
        yes = last in ctx
        return (-0.2 if yes else -2.0) if token == " True" else (-2.0 if yes else -0.2)

    judge = LMSupport(FakeLM(token_logprob=lp))
    passages = ["json.dumps returns a string. Python was first released in 1989.", "", "Rome lies on the Tiber."]
    checks = check_facts(passages, judge, index.search, k=2)
    assert [f.supported for f in checks[0].facts] == [True, False]
    assert checks[0].facts[0].score == pytest.approx(1 / (1 + math.exp(1.8)))
    assert checks[1].failed and "non-empty" in checks[1].failed  # the batch goes on
    assert checks[2].precision == 1.0
    assert mean_factscore(checks) == pytest.approx((0.5 * length_penalty(2) + length_penalty(1)) / 2)
    # no retriever: the judge sees no evidence, so nothing is supported
    (bare,) = check_facts(passages[:1], judge)
    assert bare.precision == 0.0 and all(f.evidence == () for f in bare.facts)


def test_lm_decomposer_and_garbage_judges(index):
    answers = {
        "Guido van Rossum created Python in 1991.": "- Guido van Rossum created Python.\n2) Python appeared in 1991.",
        "Rome is in Italy.": "",  # nothing: the sentence is kept whole as its one fact
    }
    lm = FakeLM(reply=lambda p, i: next(v for k, v in answers.items() if k in p))
    assert parse_list("Facts:\n- a b\n* c\n\n3. d\nQ4: e?") == ["Facts:", "a b", "c", "d", "e?"]
    passage = "Guido van Rossum created Python in 1991. Rome is in Italy."
    (check,) = check_facts([passage], LexicalSupport(), index.search, decompose=LMDecomposer(lm), k=1)
    assert [f.fact for f in check.facts] == [
        "Guido van Rossum created Python.",
        "Python appeared in 1991.",
        "Rome is in Italy.",
    ]
    assert [f.sentence for f in check.facts] == [0, 0, 1]
    garbage = LMSupport(FakeLM(reply=lambda p, i: "maybe?"), verdict=TextVerdict("true", "false"))
    (bad,) = check_facts([passage], garbage, index.search)
    assert bad.failed and "could be judged" in bad.failed and len(bad.facts) == 2
    assert all(f.failed for f in bad.facts)
    with pytest.raises(DataError, match="scored response"):
        mean_factscore([bad])
    with pytest.raises(ConfigError, match="k >= 1"):
        check_facts([passage], LexicalSupport(), index.search, k=0)


def test_empty_knowledge_source_is_a_clear_error():
    retrieval = pytest.importorskip("notelab.data.retrieval")
    with pytest.raises(DataError, match="empty source"):
        retrieval.BM25Index.from_texts([])


def test_nli_support_uses_the_best_entailed_passage(index, tmp_path):
    from test_selfcheck import _tiny_nli

    from notelab.hallucination.factscore import NLISupport
    from notelab.hallucination.selfcheck import NLIModel

    nli = NLIModel.from_folder(_tiny_nli(tmp_path, {0: "entailment", 1: "neutral", 2: "contradiction"}))
    facts, evidence = ["Python was released in 1991.", "Rome is in Italy."], [KB[:2], []]
    judged = NLISupport(nli)(facts, evidence)
    p = torch.softmax(nli.logits(KB[:2], [facts[0]] * 2), dim=-1)[:, 0]
    assert judged[0][0] == pytest.approx(1 - p.max().item(), rel=1e-5)
    assert judged[0][1] == (p.max().item() >= 0.5)
    assert judged[1] == (1.0, False)  # no evidence, no support
    assert all(ok for _, ok in NLISupport(nli, threshold=0.0)(facts[:1], evidence[:1]))
    (check,) = check_facts([" ".join(facts)], NLISupport(nli, threshold=1.01), index.search, k=2)
    assert check.precision == 0.0 and check.detector.sentence_scores == [1.0, 1.0]


def test_knowledge_source_from_a_folder(tmp_path):
    retrieval = pytest.importorskip("notelab.data.retrieval")
    (tmp_path / "cities.txt").write_text(KB[3] + "\n\nParis is the capital of France.\n")
    (tmp_path / "stdlib.jsonl").write_text(json.dumps({"text": KB[1], "title": "os.path"}) + "\n")
    index = retrieval.BM25Index.from_folder(tmp_path)
    (check,) = check_facts(
        ["Rome lies on the river Tiber. os.path.join joins path components."], LexicalSupport(), index.search, k=1
    )
    assert [f.supported for f in check.facts] == [True, True]
    assert check.facts[0].sources[0].startswith("cities.txt") and "stdlib.jsonl" in check.facts[1].sources[0]
