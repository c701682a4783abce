import pytest
import torch

from notelab.core.errors import ConfigError, ShapeError
from notelab.seq import RNNSeq2Seq, RNNSeq2SeqConfig, seq2seq_loss
from notelab.train import TrainConfig, fit

V = 13


def tiny(cell="lstm", **kw) -> RNNSeq2Seq:
    torch.manual_seed(0)
    cfg = dict(src_vocab=V, tgt_vocab=V, cell=cell, d_embed=8, d_hidden=16, d_attn=8, dropout=0.0, max_len=32)
    return RNNSeq2Seq(RNNSeq2SeqConfig(**{**cfg, **kw})).eval()


def ids(b, t, seed=0):
    return torch.randint(3, V, (b, t), generator=torch.Generator().manual_seed(seed))


VARIANTS = [
    dict(cell="rnn"),
    dict(cell="lstm"),
    dict(cell="gru"),
    dict(cell="lstm", attention="general", n_layers=2),
    dict(cell="gru", attention="none", bidirectional=False),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_shapes_and_memory(kw):
    m = tiny(**kw)
    src, tgt = ids(3, 7), ids(3, 5, 1)
    assert m(src, tgt).shape == (3, 5, V)
    mem = m.encode(src)
    dirs = 1 if kw.get("bidirectional") is False else 2
    assert mem.states.shape == (3, 7, dirs * 16)
    assert mem.h0.shape == (3, kw.get("n_layers", 1), 16)
    assert mem.c0.shape[-1] == (16 if kw["cell"] == "lstm" else 0)


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_padding_does_not_change_real_tokens(kw):
    m = tiny(**kw)
    src, tgt = ids(2, 5), ids(2, 6, 1)
    src[1, 3:] = 0  # a genuinely shorter second source
    padded_src = torch.cat([src, torch.zeros(2, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(m.encode(padded_src).states[:, :5], m.encode(src).states, atol=1e-6, rtol=1e-5)
    padded_tgt = torch.cat([tgt, torch.zeros(2, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(m(padded_src, padded_tgt)[:, :6], m(src, tgt), atol=1e-6, rtol=1e-5)
    # the shorter source really is read to its end only: its final state differs from reading the pads
    no_mask = torch.zeros_like(padded_src, dtype=torch.bool)
    assert not torch.allclose(m.encode(padded_src, no_mask).h0, m.encode(padded_src).h0)


def test_decoder_output_at_i_ignores_later_tokens_and_cache_matches():
    m = tiny("gru")
    src, tgt = ids(2, 6), ids(2, 8, 1)
    changed = tgt.clone()
    changed[:, 4:] = ids(2, 4, 2)
    a, b = m(src, tgt), m(src, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])
    mem = m.encode(src)
    cache = m.init_cache(mem)
    steps = [m.decode(tgt[:, i : i + 1], mem, cache=cache) for i in range(8)]
    torch.testing.assert_close(torch.cat(steps, 1), m.decode(tgt, mem), atol=1e-6, rtol=1e-5)


def test_checkpoint_round_trip(tmp_path):
    m = tiny("lstm", tie_embeddings=True, d_embed=16)
    m.save_pretrained(tmp_path)
    loaded = RNNSeq2Seq.from_pretrained(tmp_path).eval()
    src, tgt = ids(2, 5), ids(2, 4, 1)
    torch.testing.assert_close(loaded(src, tgt), m(src, tgt))
    assert loaded.lm_head.weight is loaded.tgt_embed.weight


def test_lstm_forget_gate_bias_is_one():
    m = tiny("lstm")
    b = m.encoder.bias_ih_l0 + m.encoder.bias_hh_l0
    assert torch.all(b[16:32] == 1) and torch.all(b[:16] == 0)


def test_bad_input_is_a_clear_error():
    m = tiny()
    with pytest.raises(ShapeError, match="non-empty"):
        m(torch.zeros(2, 0, dtype=torch.long), ids(2, 3))
    with pytest.raises(ShapeError, match=r"token ids in \[0, 13\)"):
        m(ids(2, 3), ids(2, 3) + V)
    with pytest.raises(ShapeError, match="beyond the configured max_len 32"):
        m(ids(1, 33), ids(1, 3))
    left = ids(1, 4)
    left[0, 0] = 0
    with pytest.raises(ShapeError, match="padding on the right"):
        m(left, ids(1, 3))
    with pytest.raises(ConfigError, match="unknown cell 'transformer'"):
        RNNSeq2SeqConfig(cell="transformer")
    with pytest.raises(ConfigError, match="tie_embeddings"):
        RNNSeq2SeqConfig(d_embed=8, d_hidden=16, tie_embeddings=True)


def copy_task(step, generator, b=16, n=6):
    x = torch.randint(3, V, (b, n), generator=generator)
    tgt_in = torch.cat([torch.ones(b, 1, dtype=torch.long), x], 1)
    tgt_out = torch.cat([x, torch.full((b, 1), 2)], 1)
    return x, tgt_in, tgt_out


def test_tiny_copy_task_loss_decreases_with_fit():
    m = tiny("gru", d_hidden=32, d_embed=16).train()
    cfg = TrainConfig(steps=40, lr=1e-2, log_every=5, progress=False, device="cpu", schedule="constant")
    result = fit(m, seq2seq_loss, copy_task, cfg)
    losses = [r["loss"] for r in result.history]
    assert losses[-1] < 0.8 * losses[0], losses
