import math

import pytest
import torch
import torch.nn.functional as F

from notelab.core.errors import ConfigError, ShapeError
from notelab.seq import (
    Transformer,
    TransformerConfig,
    label_smoothed_ce,
    noam_lr,
    noam_peak_lr,
    noam_schedule,
    seq2seq_loss,
)
from notelab.seq.transformer import interleaved_positions

V = 17


def tiny(**kw) -> Transformer:
    torch.manual_seed(0)
    cfg = dict(src_vocab=V, tgt_vocab=V, d_model=16, n_heads=2, n_layers_enc=2, n_layers_dec=2, d_ff=32, max_len=24)
    return Transformer(TransformerConfig(**{**cfg, **kw})).eval()


def ids(b, t, seed=0, lo=3):
    return torch.randint(lo, V, (b, t), generator=torch.Generator().manual_seed(seed))


def test_positions_are_the_papers_interleaved_sinusoids():
    pe = interleaved_positions(10, 8)
    p = torch.arange(10.0)[:, None]
    i = torch.arange(4.0)[None]
    torch.testing.assert_close(pe[:, 0::2], torch.sin(p / 10000 ** (2 * i / 8)))
    torch.testing.assert_close(pe[:, 1::2], torch.cos(p / 10000 ** (2 * i / 8)))


def test_shapes_and_scaled_embedding():
    m = tiny()
    assert m(ids(2, 5), ids(2, 7, 1)).shape == (2, 7, V)
    assert m.encode(ids(2, 5)).shape == (2, 5, 16)
    # the input to the first layer is E x * sqrt(d_model) + PE (sec. 3.4)
    x = m._embed(m.src_embed, ids(1, 3))
    torch.testing.assert_close(x, m.src_embed(ids(1, 3)) * 4.0 + interleaved_positions(24, 16)[:3])


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_output_at_i_ignores_later_tokens(norm_first):
    m = tiny(norm_first=norm_first)
    src, tgt = ids(2, 6), ids(2, 8, 1)
    changed = tgt.clone()
    changed[:, 4:] = ids(2, 4, 2)
    a, b = m(src, tgt), m(src, changed)
    torch.testing.assert_close(a[:, :4], b[:, :4])
    assert not torch.allclose(a[:, 4:], b[:, 4:])


@pytest.mark.parametrize("norm_first", [False, True])
def test_padding_does_not_change_real_tokens(norm_first):
    m = tiny(norm_first=norm_first)
    src, tgt = ids(2, 5), ids(2, 6, 1)
    padded_src = torch.cat([src, torch.zeros(2, 4, dtype=torch.long)], 1)
    torch.testing.assert_close(m.encode(padded_src)[:, :5], m.encode(src), atol=1e-5, rtol=1e-5)
    # source padding (auto-detected from pad_id) and right target padding leave the real logits alone
    padded_tgt = torch.cat([tgt, torch.zeros(2, 3, dtype=torch.long)], 1)
    torch.testing.assert_close(m(padded_src, padded_tgt)[:, :6], m(src, tgt), atol=1e-5, rtol=1e-5)
    # without the mask the padding would matter
    no_mask = torch.zeros_like(padded_src, dtype=torch.bool)
    assert not torch.allclose(m(padded_src, tgt, src_pad=no_mask), m(src, tgt), atol=1e-4)


def test_cached_decode_equals_full_decode():
    m = tiny(norm_first=True)
    src, tgt = ids(2, 5), ids(2, 7, 1)
    memory = m.encode(src)
    full = m.decode(tgt, memory)
    cache = m.init_cache(memory)
    steps = [m.decode(tgt[:, :3], memory, cache=cache)] + [
        m.decode(tgt[:, i : i + 1], memory, cache=cache) for i in range(3, 7)
    ]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    assert cache.length == 7


def test_tied_embeddings_and_checkpoint_round_trip(tmp_path):
    m = tiny(share_src_tgt=True)
    assert m.lm_head.weight is m.tgt_embed.weight is m.src_embed.weight
    src, tgt = ids(2, 5), ids(2, 4, 1)
    m.save_pretrained(tmp_path)
    loaded = Transformer.from_pretrained(tmp_path).eval()
    assert loaded.lm_head.weight is loaded.tgt_embed.weight
    torch.testing.assert_close(loaded(src, tgt), m(src, tgt))
    untied = tiny(tie_embeddings=False)
    assert untied.lm_head.weight is not untied.tgt_embed.weight


def test_paper_presets():
    base = TransformerConfig.from_name("base", src_vocab=100, tgt_vocab=100)
    assert (base.d_model, base.n_heads, base.d_ff, base.n_layers_enc, base.dropout) == (512, 8, 2048, 6, 0.1)
    assert TransformerConfig.from_name("big", dropout=0.1).d_ff == 4096


def test_pre_ln_has_final_norms_post_ln_does_not():
    assert isinstance(tiny(norm_first=True).enc_norm, torch.nn.LayerNorm)
    assert isinstance(tiny(norm_first=False).dec_norm, torch.nn.Identity)


def test_bad_input_is_a_clear_error():
    m = tiny()
    with pytest.raises(ShapeError, match="non-empty"):
        m(torch.zeros(2, 0, dtype=torch.long), ids(2, 3))
    with pytest.raises(ShapeError, match=r"token ids in \[0, 17\)"):
        m(ids(2, 3) + 20, ids(2, 3))
    with pytest.raises(ShapeError, match=r"token ids in \[0, 17\)"):
        m(ids(2, 3), ids(2, 3) - 5)
    with pytest.raises(ShapeError, match="beyond the configured max_len 24"):
        m(ids(1, 25), ids(1, 3))
    with pytest.raises(ShapeError, match="all-padding row"):
        m(torch.zeros(1, 4, dtype=torch.long), ids(1, 3))
    with pytest.raises(ShapeError, match=r"\(B, T\)"):
        m(ids(1, 4)[0], ids(1, 3))
    with pytest.raises(ConfigError, match="unknown Transformer preset 'huge'; known: base, big, tiny"):
        TransformerConfig.from_name("huge")
    with pytest.raises(ConfigError, match="divisible by n_heads"):
        TransformerConfig(d_model=10, n_heads=4)
    with pytest.raises(ConfigError, match="share_src_tgt"):
        TransformerConfig(src_vocab=5, tgt_vocab=6, share_src_tgt=True)


def test_label_smoothing_matches_torch_and_ignores_pad():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, V, generator=g)
    target = torch.randint(1, V, (3, 5), generator=g)
    target[0, 3:] = 0
    for eps in (0.0, 0.1):
        want = F.cross_entropy(logits.view(-1, V), target.view(-1), ignore_index=0, label_smoothing=eps)
        torch.testing.assert_close(label_smoothed_ce(logits, target, eps, pad_id=0), want)
    # changing the logits at a pad target changes nothing
    other = logits.clone()
    other[0, 4] += 10
    torch.testing.assert_close(label_smoothed_ce(other, target), label_smoothed_ce(logits, target))
    with pytest.raises(ShapeError):
        label_smoothed_ce(logits, target[:, :4])


def test_noam_schedule_eq3():
    assert noam_lr(4000, 512, 4000) == pytest.approx(512**-0.5 * 4000**-0.5)
    assert noam_peak_lr(512, 4000) == pytest.approx(6.988e-4, rel=1e-3)
    assert noam_lr(100, 512, 4000) == pytest.approx(512**-0.5 * 100 * 4000**-1.5)
    assert noam_lr(16000, 512, 4000) == pytest.approx(512**-0.5 / math.sqrt(16000))
    fn = noam_schedule(10)
    mults = [fn(s) for s in range(40)]
    assert mults.index(max(mults)) == 9 and mults[9] == pytest.approx(1.0)
    for s in (0, 5, 30):  # 0-based fit step s is the paper's step s + 1, normalised to the peak
        assert fn(s) * noam_peak_lr(64, 10) == pytest.approx(noam_lr(s + 1, 64, 10))


def test_seq2seq_loss_reports_metrics_and_backpropagates():
    m = tiny(dropout=0.0).train()
    src, tgt = ids(2, 5), ids(2, 6, 1)
    tgt_out = torch.cat([tgt[:, 1:], torch.full((2, 1), 2)], 1)
    loss, metrics = seq2seq_loss(m, (src, tgt, tgt_out), None, eps=0.1)
    loss.backward()
    assert set(metrics) == {"nll", "acc"} and 0.0 <= metrics["acc"] <= 1.0
    with torch.no_grad():
        want_nll = F.cross_entropy(m(src, tgt).view(-1, V), tgt_out.reshape(-1), ignore_index=0)
    assert metrics["nll"] == pytest.approx(want_nll.item(), rel=1e-5)
    assert m.src_embed.weight.grad.abs().sum() > 0
