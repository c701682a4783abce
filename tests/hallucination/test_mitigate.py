"""Retrieval-augmented answering and chain-of-verification over a scripted fake model: retrieval changes
the answer, verification questions are answered without the draft, failures are recorded per item."""

import pytest
from test_detectors import FakeLM

from notelab.core.errors import ConfigError
from notelab.hallucination.mitigate import (
    Decoding,
    answer_questions,
    chain_of_verification,
    plan_questions,
)

KB = [
    "Rome is the capital of Italy and lies on the river Tiber.",
    "The json module encodes and decodes JSON.",
    "Paris is the capital of France.",
]


@pytest.fixture
def index():
    retrieval = pytest.importorskip("notelab.data.retrieval")
    return retrieval.BM25Index.from_texts(KB, sources=[f"kb:{i}" for i in range(len(KB))])


def _knows_only_context(prompt, i):
    """Answers from the passages in its prompt; closed-book it is wrong."""
    if "Question: Where is Rome?" in prompt:
        return "Italy." if "capital of Italy" in prompt else "France."
    return ""


def test_retrieval_fixes_the_closed_book_answer(index):
    lm = FakeLM(reply=_knows_only_context)
    closed, rag = answer_questions(lm, ["Where is Rome?"]), answer_questions(lm, ["Where is Rome?"], index.search, k=1)
    assert closed[0].text == "France." and closed[0].evidence == ()
    assert rag[0].text == "Italy." and rag[0].sources == ("kb:0",) and rag[0].evidence == (KB[0],)
    assert "capital of Italy" in lm.prompts_seen[-1] and "Paris" not in lm.prompts_seen[-1]


def test_answers_pass_decoding_through_and_record_failures():
    lm = FakeLM(reply=lambda p, i: f"sample {i}" if "Rome" in p else "")
    out = answer_questions(lm, ["Where is Rome?", "  ", "Unknown?"], decoding=Decoding(n=3, temperature=0.8, top_p=0.7))
    assert out[0].answers == ("sample 0", "sample 1", "sample 2") and out[0].failed is None
    assert out[1].failed and "non-empty question" in out[1].failed
    assert out[2].failed and "empty text for all 3 samples" in out[2].failed
    assert lm.top_p_seen == 0.7
    sampling = pytest.importorskip("notelab.lm.sampling")
    schedule = sampling.FactualNucleus(p=0.9, decay=0.5, floor=0.2)
    answer_questions(lm, ["Where is Rome?"], decoding=Decoding(top_p=schedule))
    assert lm.top_p_seen is schedule  # factual-nucleus sampling reaches the backend unchanged
    with pytest.raises(ConfigError, match="k >= 1"):
        answer_questions(lm, ["q?"], k=0)
    with pytest.raises(ConfigError, match="temperature >= 0"):
        Decoding(temperature=-1.0)


def test_plan_questions_keep_questions_only():
    assert plan_questions("Here are checks:\n1. Is Rome in Italy?\n2) Is it big?\n3. Is it old?", 2) == [
        "Is Rome in Italy?",
        "Is it big?",
    ]
    assert plan_questions("- Rome's country\n- Rome's river", 3) == ["Rome's country", "Rome's river"]
    assert plan_questions("", 3) == []


def _cove_lm(plan="1. In which country is Rome?\n2. Which river crosses Rome?", revise=True):
    def reply(p, i):
        if "Verification:" in p:
            return "Rome is in Italy, on the Tiber." if revise and "A: Italy." in p else ""
        if "Write up to" in p:
            return plan
        if p.startswith("Question: Where is Rome?"):
            return "Rome is in France, on the Seine."
        if "country is Rome" in p:
            return "Italy."
        if "river crosses Rome" in p:
            return "The Tiber."
        return ""

    return FakeLM(reply=reply)


def test_chain_of_verification_answers_checks_without_the_draft():
    lm = _cove_lm()
    (v,) = chain_of_verification(lm, ["Where is Rome?"])
    assert v.draft == "Rome is in France, on the Seine."
    assert v.checks == (("In which country is Rome?", "Italy."), ("Which river crosses Rome?", "The Tiber."))
    assert v.final == "Rome is in Italy, on the Tiber." and v.failed is None
    verify = [p for p in lm.prompts_seen if "In which country is Rome?" in p and "Draft" not in p]
    assert verify == ["Question: In which country is Rome?\nAnswer:"]  # factored: the draft is not shown


def test_chain_of_verification_records_failed_stages(index):
    (no_plan,) = chain_of_verification(_cove_lm(plan=""), ["Where is Rome?"])
    assert no_plan.failed.startswith("plan") and no_plan.final == no_plan.draft
    (no_rev,) = chain_of_verification(_cove_lm(revise=False), ["Where is Rome?"])
    assert no_rev.failed.startswith("revise") and no_rev.final == no_rev.draft and len(no_rev.checks) == 2
    drafts = chain_of_verification(_cove_lm(), ["Where is Rome?", "Who knows?"], max_checks=1, retriever=index.search)
    assert drafts[1].failed.startswith("draft") and drafts[0].failed is None and len(drafts[0].checks) == 1
    with pytest.raises(ConfigError, match="max_checks"):
        chain_of_verification(_cove_lm(), ["q"], max_checks=0)


def test_a_refused_question_is_recorded_and_the_batch_goes_on():
    lm = FakeLM(reply=lambda p, i: "Italy.", refuse=lambda p: "LONG" in p)
    ok, refused = answer_questions(lm, ["Where is Rome?", "LONG question?"])
    assert ok.text == "Italy." and ok.failed is None
    assert refused.answers == () and refused.failed.startswith("fake: item 0: expected a prompt within the context")
