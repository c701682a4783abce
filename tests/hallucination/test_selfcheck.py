"""SelfCheckGPT's three sampling-consistency detectors: n-gram by hand and against the selfcheckgpt
package, prompt-based with a fake judge, NLI with a tiny random classifier saved to a folder."""

import math

import pytest
import torch
from test_detectors import FakeLM

from notelab.core.errors import ConfigError, DataError
from notelab.hallucination.selfcheck import (
    LogprobVerdict,
    NLIModel,
    TextVerdict,
    contradiction_prob,
    label_index,
    parse_answer,
    selfcheck_ngram,
    selfcheck_nli,
    selfcheck_prompt,
)
from notelab.hallucination.text import words

PASSAGE = "Python was created by Guido van Rossum. It was first released in 1991. Its name comes from Monty Python."
SAMPLES = [
    "Python was created by Guido van Rossum in the Netherlands. It appeared in 1991.",
    "Guido van Rossum designed Python. It was released in 1989, named after a snake.",
    "Python is a language by Guido. It came out in 1991 and is named after Monty Python's Flying Circus.",
]


def test_unigram_and_bigram_by_hand():
    # tokens of "a b. a c." + "a b.": a a a b b c . . .  (N = 9)
    u = selfcheck_ngram("a b. a c.", ["a b."], n=1)
    assert u.avg.sentences == ["a b.", "a c."]
    lp = {"a": math.log(3 / 9), "b": math.log(2 / 9), "c": math.log(1 / 9), ".": math.log(3 / 9)}
    assert u.avg.sentence_scores == pytest.approx(
        [-(lp["a"] + lp["b"] + lp["."]) / 3, -(lp["a"] + lp["c"] + lp["."]) / 3]
    )
    assert u.max.sentence_scores == pytest.approx([-lp["b"], -lp["c"]])
    assert u.avg.passage_score == pytest.approx(-(2 * lp["a"] + lp["b"] + lp["c"] + 2 * lp["."]) / 6)
    assert u.max.passage_score == pytest.approx((-lp["b"] - lp["c"]) / 2)
    # bigrams (<s>,a) x3, (a,b) x2, (b,.) x2, (a,c), (c,.): N = 9; add-k smoothing over V = 5 + <unk>
    b = selfcheck_ngram("a b. a c.", ["a b."], sentences=["a c."], n=2, k=1.0)
    p = [(3 + 1) / 15, (1 + 1) / 15, (1 + 1) / 15]
    assert b.avg.sentence_scores == pytest.approx([-sum(map(math.log, p)) / 3])
    # a sentence the samples never saw is infinitely surprising without smoothing
    assert selfcheck_ngram("a b.", [], sentences=["z"], n=1).avg.sentence_scores == [math.inf]


def test_consistent_sentence_scores_lower():
    s = selfcheck_ngram(PASSAGE, SAMPLES, n=1)
    # "Its name comes from Monty Python." is the least supported of the three by the samples
    assert s.avg.sentence_scores[2] == max(s.avg.sentence_scores)
    with pytest.raises(DataError, match="non-empty"):
        selfcheck_ngram("  ", SAMPLES)
    with pytest.raises(ConfigError, match="n >= 1"):
        selfcheck_ngram(PASSAGE, SAMPLES, n=0)


def _blank_spacy():
    spacy = pytest.importorskip("spacy")
    nlp = spacy.blank("en")
    nlp.add_pipe("sentencizer")
    return nlp


@pytest.mark.parametrize("n", [1, 2, 3])
def test_ngram_equals_selfcheckgpt(n, monkeypatch):
    """selfcheckgpt loads spaCy's en_core_web_sm, which is a GitHub download, not a PyPI package: its
    ``spacy.load`` is patched to a blank English pipeline with the rule-based sentencizer, and the same
    pipeline is passed to ours as tokenize / split, so both sides count the same tokens."""
    modeling_ngram = pytest.importorskip("selfcheckgpt.modeling_ngram")
    from selfcheckgpt.modeling_selfcheck import SelfCheckNgram

    nlp = _blank_spacy()
    monkeypatch.setattr(modeling_ngram.spacy, "load", lambda name: nlp)
    sentences = [s.text.strip() for s in nlp(PASSAGE).sents]
    ref = SelfCheckNgram(n=n).predict(sentences=sentences, passage=PASSAGE, sampled_passages=SAMPLES)
    ours = selfcheck_ngram(
        PASSAGE,
        SAMPLES,
        sentences=sentences,
        n=n,
        tokenize=lambda s: [t.text for t in nlp(s)],
        split=lambda t: [s.text.strip() for s in nlp(t).sents],
    )
    assert ours.avg.sentence_scores == pytest.approx(ref["sent_level"]["avg_neg_logprob"], rel=1e-12)
    assert ours.max.sentence_scores == pytest.approx(ref["sent_level"]["max_neg_logprob"], rel=1e-12)
    assert ours.avg.passage_score == pytest.approx(ref["doc_level"]["avg_neg_logprob"], rel=1e-12)
    assert ours.max.passage_score == pytest.approx(ref["doc_level"]["avg_max_neg_logprob"], rel=1e-12)
    # our default (rule-based) tokeniser and splitter give the same scores on this prose
    default = selfcheck_ngram(PASSAGE, SAMPLES, n=n)
    assert default.avg.sentence_scores == pytest.approx(ours.avg.sentence_scores, rel=1e-12)


def test_default_words_equal_blank_spacy_on_prose():
    nlp = _blank_spacy()
    text = PASSAGE + " " + " ".join(SAMPLES) + " It isn't 3.5, it's os.path.join (a helper)."
    assert words(text, lowercase=False) == [t.text for t in nlp(text)]


def _support_judge(**kw):
    """Says Yes (logprob -0.1 vs -3) when the sentence appears in the context, No otherwise."""

    def supported(prompt):
        ctx = prompt.split("Context: ")[1].split("\n\nSentence: ")[0]
        sent = prompt.split("\n\nSentence: ")[1].split("\n\n")[0]
        return sent.rstrip(".") in ctx

    def lp(prompt, context, token):
        yes = supported(prompt)
        return (-0.1 if yes else -3.0) if token == " Yes" else (-3.0 if yes else -0.1)

    return FakeLM(reply=lambda p, i: " Yes, it is." if supported(p) else " no.", token_logprob=lp, **kw)


def test_prompt_identical_samples_give_zero_and_unsupported_one():
    judge = _support_judge()
    passage = "Rome is in Italy. Paris is in Spain."
    samples = ["Rome is in Italy. Paris is in France."] * 3
    text = selfcheck_prompt(judge, passage, samples, verdict=TextVerdict())
    assert text.sentence_scores == [0.0, 1.0] and text.passage_score == 0.5
    soft = selfcheck_prompt(judge, passage, samples)  # LogprobVerdict: P(No) / (P(Yes) + P(No))
    p_no = 1 / (1 + math.exp(2.9))
    assert soft.sentence_scores == pytest.approx([p_no, 1 - p_no])
    same = selfcheck_prompt(judge, passage, [passage] * 4, verdict=TextVerdict())
    assert same.sentence_scores == [0.0, 0.0]
    assert len(judge.prompts_seen) == 2 * 3 + 2 * 4  # one prompt per sentence x sample


def test_prompt_judge_garbage_is_half_or_a_recorded_failure():
    assert parse_answer("  YES.", "yes", "no") == 0.0
    assert parse_answer("No, never", "yes", "no") == 1.0
    assert parse_answer("nothing", "yes", "no") is None and parse_answer("", "yes", "no") is None
    mixed = FakeLM(reply=lambda p, i: "No" if "Paris" in p.split("Sentence: ")[1] else "???")
    s = selfcheck_prompt(mixed, "Rome is big. Paris is big.", ["x", "y"], verdict=TextVerdict())
    assert s.sentence_scores == [0.5, 1.0] and s.failed is None
    empty = selfcheck_prompt(FakeLM(), "Rome is big.", ["x"], verdict=TextVerdict())
    assert empty.failed and "no readable Yes/No" in empty.failed and math.isnan(empty.passage_score)
    refusing = FakeLM(reply=lambda p, i: "No", refuse=lambda p: "Context: y" in p)  # that context is "too long"
    s = selfcheck_prompt(refusing, "Rome is big.", ["x", "y"], verdict=TextVerdict())
    assert s.sentence_scores == [0.75]  # (1 + 0.5) / 2: the refused prompt counts as no answer
    nan_lm = FakeLM(token_logprob=lambda p, c, t: -math.inf)
    assert selfcheck_prompt(nan_lm, "Rome is big.", ["x"], verdict=LogprobVerdict()).failed
    with pytest.raises(DataError, match="at least one sample"):
        selfcheck_prompt(FakeLM(), "Rome is big.", [])


def _tiny_nli(path, id2label):
    transformers = pytest.importorskip("transformers")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(set(words(PASSAGE + " ".join(SAMPLES))))]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(path / "vocab.txt"))
    cfg = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        id2label=id2label,
        label2id={v: k for k, v in id2label.items()},
    )
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_nli_reads_labels_from_config_and_scores_in_range(tmp_path):
    folder = _tiny_nli(tmp_path, {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"})
    nli = NLIModel.from_folder(folder, batch_size=4)
    assert (nli.entail, nli.contradict) == (2, 0)
    s = selfcheck_nli(nli, PASSAGE, SAMPLES)
    assert len(s.sentence_scores) == 3 and all(0.0 < x < 1.0 for x in s.sentence_scores)
    # the score is the two-class softmax of the right columns, averaged over samples
    logits = nli.logits([s.sentences[0]] * 3, SAMPLES)
    assert logits.shape == (3, 3)
    direct = torch.softmax(logits[:, [2, 0]], dim=-1)[:, 1].mean().item()
    assert s.sentence_scores[0] == pytest.approx(direct, rel=1e-5)
    assert s.passage_score == pytest.approx(sum(s.sentence_scores) / 3)
    # identical sentence/sample pairs give identical scores whatever the sample's position
    assert selfcheck_nli(nli, PASSAGE, [SAMPLES[0]] * 2).sentence_scores == pytest.approx(
        selfcheck_nli(nli, PASSAGE, [SAMPLES[0]]).sentence_scores, rel=1e-5
    )


def test_nli_label_mapping_errors(tmp_path):
    assert label_index({"0": "entailment", "1": "contradiction"}, "contradict") == 1
    with pytest.raises(ConfigError, match="label starting with 'entail'"):
        label_index({0: "LABEL_0", 1: "LABEL_1", 2: "LABEL_2"}, "entail")
    folder = _tiny_nli(tmp_path, {0: "LABEL_0", 1: "LABEL_1"})
    with pytest.raises(ConfigError, match="LABEL_0"):
        NLIModel.from_folder(folder)
    with pytest.raises(ConfigError, match="config.json"):
        NLIModel.from_folder(tmp_path / "missing")
    p = contradiction_prob(torch.tensor([[0.0, 5.0, 0.0]]), entail=0, contradict=2)
    assert p.item() == pytest.approx(0.5)


def test_sample_responses_greedy_passage_and_n_samples():
    from notelab.hallucination.selfcheck import sample_responses

    lm = FakeLM(reply=lambda p, i: f" {p} answer {i} ")
    (r,) = sample_responses(lm, ["Q"], n=3, top_p=0.9)
    assert r.passage == "Q answer 0" and r.samples == ("Q answer 0", "Q answer 1", "Q answer 2")
    assert lm.top_p_seen == 0.9
    with pytest.raises(ConfigError, match="temperature > 0"):
        sample_responses(lm, ["Q"], temperature=0.0)


def test_nli_equals_selfcheckgpt_selfchecknli(tmp_path):
    """SelfCheckNLI loads a DeBERTa-v2 classifier (labels entailment, contradiction) by path: a tiny random
    one with a tiny Unigram vocabulary is saved to a folder and both sides score the same pairs. The
    package calls ``tokenizer.batch_encode_plus``, which transformers 5 removed; it is given back as the
    plain pair call it was."""
    pytest.importorskip("selfcheckgpt.modeling_selfcheck")
    transformers = pytest.importorskip("transformers")
    from selfcheckgpt.modeling_selfcheck import SelfCheckNLI

    pieces = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        *sorted({"\u2581" + w for w in words(PASSAGE + " ".join(SAMPLES), lowercase=False)}),
        *"abcdefghijklmnopqrstuvwxyz.,",
    ]
    tok = transformers.DebertaV2Tokenizer(vocab=[(p, -float(i)) for i, p in enumerate(pieces)])
    cfg = transformers.DebertaV2Config(
        vocab_size=len(pieces),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=128,
        type_vocab_size=2,
        id2label={0: "entailment", 1: "contradiction"},
        label2id={"entailment": 0, "contradiction": 1},
    )
    torch.manual_seed(0)
    model = transformers.DebertaV2ForSequenceClassification(cfg)
    with torch.no_grad():
        model.classifier.weight.mul_(300)  # spread the random logits so that scores differ by pair
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)

    ref = SelfCheckNLI(nli_model=str(tmp_path))
    t = ref.tokenizer
    if not hasattr(t, "batch_encode_plus"):
        pairs = lambda batch_text_or_text_pairs, **kw: t(*map(list, zip(*batch_text_or_text_pairs)), **kw)  # noqa: E731
        object.__setattr__(t, "batch_encode_plus", pairs)
    sentences = [PASSAGE.split(". ")[0] + ".", "It was first released in 1991."]
    expected = ref.predict(sentences=sentences, sampled_passages=SAMPLES)
    ours = selfcheck_nli(NLIModel.from_folder(tmp_path), PASSAGE, SAMPLES, sentences=sentences)
    assert ours.sentence_scores == pytest.approx(expected.tolist(), abs=1e-6)
    assert abs(ours.sentence_scores[0] - ours.sentence_scores[1]) > 1e-5  # the comparison can fail
