"""The in-process backends: NotelabLM (a notelab Llama) and TransformersLM (a transformers model from a folder),
each against a direct computation from its model's logits."""

import warnings

import pytest
import torch
import transformers
from torch import nn

from notelab.core.errors import CheckpointError, ConfigError, DataError, ShapeError
from notelab.data.tokenizer import Tokenizer
from notelab.hallucination import Generation, LanguageModel, NotelabLM, Scored, TransformersLM
from notelab.hallucination.backends import continuation_start
from notelab.lm import generate
from notelab.lm.config import LlamaConfig
from notelab.lm.model import Llama
from notelab.lm.sampling import FactualNucleus

TEXTS = ["The capital of France is Paris.", "def add(a, b):\n    return a + b\n", "import os, sys"] * 20
PAIRS = [("The capital of France is", " Paris."), ("def add(a, b):", "\n    return a + b"), ("import", " os")]


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    tok = Tokenizer.train(TEXTS, vocab_size=300)
    model = Llama(
        LlamaConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, multiple_of=32, max_seq_len=64)
    ).eval()
    return model, tok


def direct(model, ids):
    """(log p(x_t | x_<t), entropy) for t >= 1 from one forward of the whole row, float64."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1].double()
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


def test_notelab_logprobs_equal_a_direct_forward(tiny):
    model, tok = tiny
    lm = NotelabLM(model, tok, name="tiny")
    assert isinstance(lm, LanguageModel)
    scored = lm.logprobs([p for p, _ in PAIRS], [c for _, c in PAIRS])
    for (p, c), s in zip(PAIRS, scored):
        assert isinstance(s, Scored) and len(s.tokens) == len(s.logprobs) == len(s.entropies) > 0
        assert "".join(s.tokens) == c  # these joins fall between tokens: the pieces spell the continuation
        ids = tok.encode(p + c, add_bos=True)
        m = len(tok.encode(p, add_bos=True))
        assert ids[:m] == tok.encode(p, add_bos=True)
        lp, ent = direct(model, ids)
        assert s.logprobs == pytest.approx(lp[m - 1 :].tolist(), abs=1e-5)
        assert s.entropies == pytest.approx(ent[m - 1 :].tolist(), abs=1e-5)
        assert s.total == pytest.approx(float(lp[m - 1 :].sum()), abs=1e-4)
    assert lm.logprobs(["import"], [""])[0] == Scored((), (), ())


def test_notelab_generate_greedy_sampled_and_factual(tiny):
    model, tok = tiny
    lm = NotelabLM(model, tok, seed=3)
    prompts = ["The capital", "def add("]
    greedy = lm.generate(prompts, n=2, temperature=0, max_new_tokens=8)
    for prompt, (a, b) in zip(prompts, greedy):
        ids = tok.encode(prompt, add_bos=True)
        ref = generate(model, [ids], 8, stop_tokens=[tok.eos_id])[0]
        assert a == b and a.text == tok.decode(ref) and "".join(a.tokens) == a.text
        assert a.logprobs == pytest.approx(direct(model, ids + ref)[0][len(ids) - 1 :].tolist(), abs=1e-5)
    sampled = lm.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=8)
    assert sampled == lm.generate(prompts, n=3, temperature=1.0, top_p=0.95, max_new_tokens=8)  # seeded
    assert len({g.text for g in sampled[0]}) > 1  # three different draws
    for g in sampled[1]:
        assert isinstance(g, Generation) and len(g.tokens) == len(g.logprobs) <= 8
    nucleus = FactualNucleus.for_tokenizer(tok, p=0.9, decay=0.5, floor=0.2)
    factual = lm.generate(prompts, n=2, temperature=1.0, top_p=nucleus, max_new_tokens=8)
    assert [len(row) for row in factual] == [2, 2]


def test_a_model_that_says_nothing_gives_empty_text(tiny):
    model, tok = tiny
    mute = Llama(model.config).eval()
    mute.load_state_dict(model.state_dict())
    head = nn.Linear(model.config.dim, model.config.vocab_size, bias=True)
    with torch.no_grad():  # logits = the bias alone: the end-of-text token wins every step
        head.weight.zero_()
        head.bias.fill_(-10.0)
        head.bias[tok.eos_id] = 10.0
    mute.lm_head = head
    (gen,) = NotelabLM(mute, tok).generate(["hello"], max_new_tokens=5)[0]
    assert gen == Generation(text="", tokens=(), logprobs=())


def test_notelab_bad_input(tiny):
    model, tok = tiny
    lm = NotelabLM(model, tok)
    with pytest.raises(ConfigError, match="temperature"):
        lm.generate(["x"], temperature=-1)
    with pytest.raises(ConfigError, match="n an integer"):
        lm.generate(["x"], n=0)
    with pytest.raises(ConfigError, match="top_p"):
        lm.generate(["x"], top_p=0.0)
    with pytest.raises(ConfigError, match="list of prompt strings"):
        lm.generate("x")
    with pytest.raises(ConfigError, match="one length"):
        lm.logprobs(["a", "b"], ["c"])
    with pytest.raises(ShapeError, match="item 1: .*context of 64 tokens"):
        lm.logprobs(["a", "b"], ["c", " x" * 80])
    small = Tokenizer.train(TEXTS, vocab_size=400)
    with pytest.raises(ConfigError, match="at most"):
        NotelabLM(Llama(LlamaConfig(vocab_size=260, dim=32, n_layers=1, n_heads=2, multiple_of=32)), small)


def test_continuation_start_counts_a_spanning_token_as_the_continuation():
    # "ab|cd" as tokens "a", "bc", "d" (offsets 0, 1, 3): "bc" spans the join at 2 and is scored
    assert continuation_start([0, 1, 3], 4, 2) == 1
    assert continuation_start([0, 0, 2], 4, 2) == 2  # a BOS (zero width at 0), then "ab", "cd"
    assert continuation_start([0, 0, 2], 4, 4) == 3  # an empty continuation: no token
    assert continuation_start([0, 2], 4, 0) == 0  # no prompt: the first token is the continuation's


# --- transformers ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(tiny, tmp_path_factory):
    _, tok = tiny
    folder = tmp_path_factory.mktemp("hf") / "tiny-hf"
    tok.save(folder)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"), bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    fast.add_bos_token = True
    cfg = transformers.LlamaConfig(
        vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, bos_token_id=tok.bos_id, eos_token_id=tok.eos_id,
        pad_token_id=tok.pad_id,
    )  # fmt: skip
    torch.manual_seed(1)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():  # decisive argmaxes: greedy tokens do not hang on float noise
            p.normal_(0, 0.3)
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def test_transformers_logprobs_equal_the_logits_of_the_saved_model(hf_dir):
    lm = TransformersLM.from_dir(hf_dir)
    assert lm.name == "tiny-hf" and isinstance(lm, LanguageModel)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    scored = lm.logprobs([p for p, _ in PAIRS], [c for _, c in PAIRS])
    for (p, c), s in zip(PAIRS, scored):
        ids = tok(p + c).input_ids
        m = len(tok(p).input_ids)
        assert ids[0] == tok.bos_token_id and ids[:m] == tok(p).input_ids
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)
        expected = logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0][m - 1 :]
        assert len(s.tokens) == len(expected) and "".join(s.tokens) == c
        assert s.logprobs == pytest.approx(expected.tolist(), abs=1e-5)
        ent = -(logp.exp() * logp).sum(-1)[m - 1 :]
        assert s.entropies == pytest.approx(ent.tolist(), abs=1e-5)


def test_transformers_generate_greedy_is_the_argmax_chain(hf_dir):
    lm = TransformersLM.from_dir(hf_dir)
    ((a, b),) = lm.generate(["The capital"], n=2, max_new_tokens=5)
    assert a == b and len(a.tokens) == len(a.logprobs) and "".join(a.tokens) == a.text
    model, tok = lm.model, lm.tokenizer
    ids = tok("The capital").input_ids
    new, lps = [], []
    for _ in range(5):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids + new])).logits[0, -1].double(), -1)
        t = int(logp.argmax())
        if t == tok.eos_token_id:
            break
        new.append(t)
        lps.append(float(logp[t]))
    assert a.text == tok.decode(new, skip_special_tokens=True) and a.logprobs == pytest.approx(lps, abs=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sampled = lm.generate(["The capital", "def"], n=3, temperature=1.0, top_p=0.9, max_new_tokens=4)
    assert [len(r) for r in sampled] == [3, 3] and sampled == lm.generate(
        ["The capital", "def"], n=3, temperature=1.0, top_p=0.9, max_new_tokens=4
    )
    with pytest.raises(ConfigError, match="cannot decay top-p"):
        lm.generate(["x"], temperature=1.0, top_p=FactualNucleus())


def test_transformers_from_dir_bad_folders(tmp_path):
    with pytest.raises(DataError, match="no such folder"):
        TransformersLM.from_dir(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="expected a transformers causal LM") as e:
        TransformersLM.from_dir(tmp_path)
    assert "\n" not in str(e.value)
