"""stdlib-facts against a language model: answers cut at the answer's end, rates per kind, distinct-n by hand,
retrieval prompts (a deterministic fake model: a test double of the LanguageModel protocol)."""

import pytest

from notelab.core.errors import ConfigError
from notelab.data.retrieval import BM25Index
from notelab.hallucination import bench
from notelab.hallucination.protocol import Generation
from notelab.hallucination.stdlib_facts import Fact

P = Fact("params", "textwrap", "wrap", "What are the parameters of textwrap.wrap, in order?", "def wrap(",
         "text, width, **kwargs")  # fmt: skip
D = Fact("default", "textwrap", "wrap", "What is the default value of the parameter width of textwrap.wrap?",
         "def wrap(text, width=", "70", "width")  # fmt: skip


class Scripted:
    """Answers each prompt with the scripted completions (cycled over n), recording the calls."""

    name = "scripted"

    def __init__(self, script):
        self.script, self.calls = script, []

    def generate(self, prompts, n=1, temperature=0.0, top_p=1.0, max_new_tokens=64):
        self.calls.append((list(prompts), n, temperature, top_p))
        return [[Generation(self.script[p][j % len(self.script[p])]) for j in range(n)] for p in prompts]

    def logprobs(self, prompts, continuations):
        raise NotImplementedError


def test_answers_are_cut_and_labelled_and_rates_count_per_fact():
    lm = Scripted({"def wrap(": ["text, width=70, **kwargs):\n    pass", "text):"],
                   "def wrap(text, width=": ["80, **kw):", "70, **kw):"]})  # fmt: skip
    answers = bench.answer_facts(lm, [P, D], n=2, temperature=1.0, batch_size=1)
    assert answers == [["text, width=70, **kwargs)", "text)"], ["80", "70"]]
    assert [c[1] for c in lm.calls] == [2, 2] and len(lm.calls) == 2  # batch_size 1: one call per fact
    labels = bench.wrong([P, D], answers)
    assert labels == [[False, True], [True, False]]
    r = bench.rates([P, D, P], [[False, True], [True, True], [False, False]])
    assert r.overall == pytest.approx((0.5 + 1.0 + 0.0) / 3)
    assert r.by_kind == {"params": 0.25, "default": 1.0} and r.n_by_kind == {"params": 2, "default": 1}
    with pytest.raises(ConfigError, match="one prompt per fact"):
        bench.answer_facts(lm, [P], prompts=[])


def test_distinct_n_by_hand():
    assert bench.distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert bench.distinct_n(["a b", "a b"], 2) == 0.5
    assert bench.distinct_n(["f(x, y)"], 1) == 1.0  # f ( x , y ): five distinct tokens
    assert bench.distinct_n(["a"], 2) == 0.0
    assert bench.mean_distinct_n([["a b", "a b"], ["c d", "d c"], ["x"]], 2) == pytest.approx((0.5 + 1.0) / 2)
    with pytest.raises(ConfigError):
        bench.distinct_n(["a"], 0)


def test_retrieval_prompts_put_the_passage_above_as_a_comment():
    index = BM25Index.from_texts(
        ["textwrap.wrap: def wrap(text, width=70, **kwargs): Wrap a paragraph.", "json.dumps: def dumps(obj): JSON."],
        ["textwrap.wrap", "json.dumps"],
    )
    (prompt,) = bench.retrieval_prompts(index, [D], k=1)
    assert prompt == "# textwrap.wrap: def wrap(text, width=70, **kwargs): Wrap a paragraph.\n" + D.prompt
    assert bench.with_passages("p", []) == "p"
    assert bench.with_passages("p", ["two\nlines"]) == "# two lines\np"
