"""Factual-nucleus sampling (Lee et al. 2022): the schedule, plain sampling as its limit, the per-row sentence
reset, and every sampled token inside the nucleus its schedule allows, on every CPU path."""

import pytest
import torch

from notelab.core.errors import ConfigError
from notelab.lm import Llama, LlamaConfig, generate
from notelab.lm.sampling import FactualNucleus, advance_sentence, factual_top_p

PATHS = ["reference", "engine"]
ENDS = frozenset({3, 17, 42})


def model_of(scale: float = 0.2) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64)
    model = Llama(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, scale)
    return model


def test_schedule_by_hand():
    f = FactualNucleus(p=0.9, decay=0.9, floor=0.3)
    # p_t = max(0.3, 0.9 * 0.9^(t-1)): 0.9, 0.81, 0.729, ... 0.9 * 0.9^10 = 0.3138, 0.9 * 0.9^11 = 0.2824 -> 0.3
    hand = [0.9, 0.81, 0.729, 0.6561, 0.59049]
    assert [f.schedule(t) for t in range(1, 6)] == pytest.approx(hand)
    assert f.schedule(11) == pytest.approx(0.9 * 0.9**10) and f.schedule(12) == 0.3 and f.schedule(100) == 0.3
    since = torch.arange(15)
    col = lambda v: torch.full((15, 1), v)  # noqa: E731
    got = factual_top_p(col(0.9), col(0.9), col(0.3), since)[:, 0]
    assert got.tolist() == pytest.approx([f.schedule(t + 1) for t in range(15)])


def test_bad_settings_are_refused():
    with pytest.raises(ConfigError, match="floor <= p"):
        FactualNucleus(p=0.5, floor=0.6)
    with pytest.raises(ConfigError, match="decay"):
        FactualNucleus(decay=0.0)
    with pytest.raises(ConfigError, match="sentence_end_ids in"):
        generate(model_of(), [[1, 2]], 2, temperature=1.0, top_p=FactualNucleus(sentence_end_ids={61}))


def test_for_tokenizer_finds_sentence_ends():
    class Toy:
        texts = ["a", " end.", "!", " why?", "\n", ".\n", "3.5", " .", "?!", "x ", "Mr", "no. "]
        vocab_size = len(texts)

        def decode(self, ids):
            return "".join(self.texts[i] for i in ids)

    f = FactualNucleus.for_tokenizer(Toy(), p=0.8, decay=0.5, floor=0.2)
    assert f.sentence_end_ids == {1, 2, 3, 4, 5, 7, 8, 11}
    assert (f.p, f.decay, f.floor) == (0.8, 0.5, 0.2)


def test_advance_resets_each_row_on_its_own():
    ends = torch.zeros(3, 10, dtype=torch.bool)
    ends[:, 4] = True
    ends[2, 7] = True  # row 2 has one more sentence end
    since = torch.tensor([5, 2, 9])
    assert advance_sentence(since, torch.tensor([4, 7, 7]), ends).tolist() == [0, 3, 0]


@pytest.mark.parametrize("path", PATHS)
def test_unit_schedule_is_plain_sampling(path):
    model = model_of()
    prompts = [[1, 2, 3], [7, 8, 9, 10, 11]]
    plain = generate(model, prompts, 12, temperature=1.0, seed=5, path=path)
    unit = generate(model, prompts, 12, temperature=1.0, top_p=FactualNucleus(1.0, 1.0, 1.0, ENDS), seed=5, path=path)
    assert unit == plain
    decayed = generate(
        model, prompts, 12, temperature=1.0, top_p=FactualNucleus(0.5, 0.5, 0.1, ENDS), seed=5, path=path
    )
    assert decayed != plain  # the schedule does change the draw


def nucleus(probs: torch.Tensor, p: float) -> set[int]:
    """The smallest set of most likely tokens whose mass reaches p (ties at its edge included)."""
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    kept = order[mass_before < p]
    edge = probs[kept].min()
    return set(torch.nonzero(probs >= edge)[:, 0].tolist())


@pytest.mark.parametrize("path", PATHS)
def test_every_token_lies_in_its_scheduled_nucleus(path):
    model = model_of(scale=0.6)  # peaked distributions: nuclei of a few tokens out of 61
    ends = frozenset(range(0, 61, 4))  # frequent sentence ends, so resets happen
    f = FactualNucleus(p=0.95, decay=0.6, floor=0.2, sentence_end_ids=ends)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
    out = generate(model, prompts, 20, temperature=1.0, top_p=f, seed=11, path=path)
    resets = 0
    for prompt, new in zip(prompts, out):
        seq, t = list(prompt), 1
        for tok in new:
            with torch.no_grad():
                probs = model(torch.tensor([seq]))[0, -1].float().softmax(-1)
            allowed = nucleus(probs, f.schedule(t))
            assert tok in allowed, (t, tok, sorted(allowed))
            seq.append(tok)
            t = 1 if tok in ends else t + 1
            resets += tok in ends
    assert resets >= 2  # the reset was exercised


def test_rows_with_and_without_the_schedule_share_an_engine_batch():
    """A plain top-p row beside a factual one in one engine batch gets the tokens it gets alone."""
    from notelab.lm.engine import Engine, SamplingParams

    model = model_of(scale=0.6)
    f = FactualNucleus(p=0.9, decay=0.5, floor=0.2, sentence_end_ids=ENDS)
    prompts, settings = [[1, 2, 3], [4, 5, 6, 7]], [f, 0.7]

    def run(rows):
        eng = Engine(model, 2, 32)
        ids = {eng.add(prompts[b], SamplingParams(10, 1.0, top_p=settings[b], seed=b)): b for b in rows}
        got = {b: [] for b in rows}
        while eng.has_work():
            for e in eng.step():
                if e.token is not None:
                    got[ids[e.request_id]].append(e.token)
        return got

    both = run([0, 1])
    assert both[0] == run([0])[0] and both[1] == run([1])[1]
    assert both[0] == generate(model, [prompts[0]], 10, temperature=1.0, top_p=f, seed=0, path="reference")[0]


def test_chain_path_refuses_the_schedule_and_the_engine_runs():
    model = model_of()
    f = FactualNucleus(sentence_end_ids=ENDS)
    with pytest.warns(RuntimeWarning, match="factual-nucleus sampling keeps a per-sentence state"):
        got = generate(model, [[1, 2, 3]], 6, temperature=1.0, top_p=f, seed=2, path="chain")
    assert got == generate(model, [[1, 2, 3]], 6, temperature=1.0, top_p=f, seed=2, path="reference")
