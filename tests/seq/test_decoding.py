import itertools
import math
from types import SimpleNamespace

import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.seq import (
    RNNSeq2Seq,
    RNNSeq2SeqConfig,
    Transformer,
    TransformerConfig,
    beam_search,
    generate,
    gnmt_length_penalty,
    greedy_decode,
)

V = 11
PAD, BOS, EOS = 0, 1, 2


def transformer(norm_first=True, vocab=V, max_len=16):
    torch.manual_seed(0)
    cfg = TransformerConfig(
        src_vocab=vocab,
        tgt_vocab=vocab,
        d_model=16,
        n_heads=2,
        n_layers_enc=1,
        n_layers_dec=2,
        d_ff=32,
        max_len=max_len,
        norm_first=norm_first,
    )
    return Transformer(cfg).eval()


def rnn(cell="lstm", vocab=V):
    torch.manual_seed(0)
    cfg = RNNSeq2SeqConfig(src_vocab=vocab, tgt_vocab=vocab, cell=cell, d_embed=8, d_hidden=16, d_attn=8, max_len=16)
    return RNNSeq2Seq(cfg).eval()


MODELS = {
    "transformer-post": lambda: transformer(False),
    "transformer-pre": transformer,
    "lstm": rnn,
    "gru": lambda: rnn("gru"),
}


def sources():
    src = torch.randint(3, V, (3, 6), generator=torch.Generator().manual_seed(1))
    src[1, 4:] = PAD
    src[2, 2:] = PAD
    return src


@pytest.mark.parametrize("name", MODELS)
def test_beam_size_one_equals_greedy(name):
    m, src = MODELS[name](), sources()
    g, g_score = greedy_decode(m, src, 12, return_scores=True)
    b, b_score = beam_search(m, src, 1, length_penalty=0.0, max_len=12, return_scores=True)
    assert torch.equal(g, b)
    torch.testing.assert_close(g_score, b_score)
    assert torch.equal(beam_search(m, src, 1, length_penalty=1.0, max_len=12), g)
    assert torch.equal(generate(m, src, beam_size=1, max_len=12), g)


@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_equals_uncached(name):
    m, src = MODELS[name](), sources()
    g1, s1 = greedy_decode(m, src, 12, return_scores=True)
    g2, s2 = greedy_decode(m, src, 12, use_cache=False, return_scores=True)
    assert torch.equal(g1, g2)
    torch.testing.assert_close(s1, s2, atol=1e-5, rtol=1e-5)
    b1, t1 = beam_search(m, src, 3, max_len=12, return_scores=True)
    b2, t2 = beam_search(m, src, 3, max_len=12, use_cache=False, return_scores=True)
    assert torch.equal(b1, b2)
    torch.testing.assert_close(t1, t2, atol=1e-5, rtol=1e-5)


class RandomLM(torch.nn.Module):
    """A fake seq2seq model: next-token logits are a fixed random function of the whole prefix.

    Its cache keeps the prefix, so a wrong ``reorder`` in beam search shows up as wrong scores.
    """

    def __init__(self, seed, vocab=5):
        super().__init__()
        self.config = SimpleNamespace(pad_id=PAD, bos_id=BOS, eos_id=EOS, max_len=8)
        self.table = torch.randn(997, vocab, generator=torch.Generator().manual_seed(seed))

    def source_padding(self, src, src_pad):
        return src == PAD if src_pad is None else src_pad

    def encode(self, src, src_pad=None):
        return src.float()

    def init_cache(self, memory, src_pad=None, max_len=None):
        cache = SimpleNamespace(length=0, prefix=torch.zeros(memory.shape[0], 0, dtype=torch.long))

        def reorder(index):
            cache.prefix = cache.prefix[index]

        cache.reorder = reorder
        return cache

    def log_probs(self, prefix):
        return torch.log_softmax(self.table[[hash(tuple(p)) % 997 for p in prefix.tolist()]], -1)

    def decode(self, tgt, memory, src_pad=None, tgt_pad=None, cache=None):
        full = tgt
        if cache is not None:
            full = cache.prefix = torch.cat([cache.prefix, tgt], 1)
            cache.length += tgt.shape[1]
        first = full.shape[1] - tgt.shape[1]
        return torch.stack([self.log_probs(full[:, : i + 1]) for i in range(first, full.shape[1])], 1)


def exhaustive_best(m, steps, alpha, vocab=5):
    """The hypothesis with the best s(Y) among all that end in EOS or reach ``steps`` tokens."""
    best, best_y = -math.inf, None
    for n in range(1, steps + 1):
        for y in itertools.product(range(vocab), repeat=n):
            if EOS in y[:-1] or (n < steps and y[-1] != EOS):
                continue
            prefixes = [torch.tensor([[BOS, *y[:i]]]) for i in range(n)]
            logp = sum(m.log_probs(p)[0, t].item() for p, t in zip(prefixes, y))
            if logp / gnmt_length_penalty(n, alpha) > best:
                best, best_y = logp / gnmt_length_penalty(n, alpha), list(y)
    return best, best_y


@pytest.mark.parametrize("seed", [0, 2])
def test_wide_beam_is_exact_search(seed):
    # 5 tokens, 4 steps: a beam of 5^4 keeps every hypothesis, so it must find the best s(Y) of all.
    m, src = RandomLM(seed), torch.tensor([[3]])
    greedy_optimal = []
    for alpha in (0.0, 0.6, 2.0):
        best, best_y = exhaustive_best(m, 4, alpha)
        for use_cache in (True, False):
            tokens, score = beam_search(m, src, 625, alpha, 4, use_cache=use_cache, return_scores=True)
            assert tokens[0].tolist() == best_y
            assert score.item() == pytest.approx(best, abs=1e-5)
        greedy_optimal.append(greedy_decode(m, src, 4)[0].tolist() == best_y)
    assert not all(greedy_optimal)  # the case is one where search matters


class Scripted(torch.nn.Module):
    """A fake seq2seq model whose next-token distribution depends on the position only.

    ``table[p]`` is the log-distribution of the token after position ``p``; ``src[:, 0]`` is the
    step at which each row's table says EOS (per-row tables via ``stops``).
    """

    def __init__(self, rows):
        super().__init__()
        self.config = SimpleNamespace(pad_id=PAD, bos_id=BOS, eos_id=EOS, max_len=8)
        self.rows = rows  # row id -> (T, V) log-probs

    def source_padding(self, src, src_pad):
        return src == PAD if src_pad is None else src_pad

    def encode(self, src, src_pad=None):
        return src

    def init_cache(self, memory, src_pad=None, max_len=None):
        return SimpleNamespace(length=0, reorder=lambda index: None)

    def decode(self, tgt, memory, src_pad=None, tgt_pad=None, cache=None):
        start = 0 if cache is None else cache.length
        if cache is not None:
            cache.length += tgt.shape[1]
        pos = torch.arange(start, start + tgt.shape[1])
        return torch.stack([self.rows[int(r)][pos] for r in memory[:, 0]])


def table(*steps):
    """Log-probs (8, 5): at each step the listed {token: prob}, then EOS for sure."""
    t = torch.full((8, 5), -30.0)
    t[:, EOS] = 0.0
    for i, probs in enumerate(steps):
        t[i] = -30.0
        for tok, p in probs.items():
            t[i, tok] = math.log(p)
    return t


def test_eos_ends_a_row_and_pads_after_it():
    rows = {3: table({3: 1.0}, {EOS: 1.0}), 4: table({4: 1.0}, {3: 1.0}, {4: 1.0}, {EOS: 1.0})}
    m = Scripted(rows)
    src = torch.tensor([[3], [4]])
    for out in (greedy_decode(m, src), beam_search(m, src, 2), greedy_decode(m, src, use_cache=False)):
        assert out.tolist() == [[3, EOS, PAD, PAD], [4, 3, 4, EOS]]  # stops once every row is done
    assert greedy_decode(m, src, 2).tolist() == [[3, EOS], [4, 3]]  # max_len cuts unfinished rows


def test_length_penalty_trades_probability_for_length():
    # EOS now (0.52) or token 3 then EOS (0.48): plain log-prob prefers the short one, alpha = 1 the long one.
    m = Scripted({3: table({EOS: 0.52, 3: 0.48}, {EOS: 1.0})})
    src = torch.tensor([[3]])
    assert greedy_decode(m, src).tolist() == [[EOS]]
    assert beam_search(m, src, 2, length_penalty=0.0).tolist() == [[EOS]]
    assert beam_search(m, src, 2, length_penalty=1.0).tolist() == [[3, EOS]]
    assert gnmt_length_penalty(2, 1.0) == pytest.approx(7 / 6)


def test_bad_arguments():
    m = transformer()
    src = sources()
    with pytest.raises(ConfigError, match="max_len in"):
        greedy_decode(m, src, 17)
    with pytest.raises(ConfigError, match="beam_size"):
        beam_search(m, src, 0)
    with pytest.raises(ShapeError, match="non-empty"):
        greedy_decode(m, src[:, :0])
