"""The llama claim's pieces on tiny settings; the full claim runs in `make demo` / `notelab reproduce`."""

import dataclasses

import pytest
import torch

from notelab.lm.flops import count_parameters
from notelab.lm.model import Llama
from notelab.lm.posttrain import MarginReport
from notelab.reproduce import llama as claim


def test_matched_pair_has_equal_parameters():
    for s in (claim.QUICK, claim.FULL):
        llama, gpt2 = claim.matched_pair(s, vocab_size=1000)
        n_llama, n_gpt2 = count_parameters(llama), count_parameters(gpt2)
        assert abs(n_llama - n_gpt2) <= 3 * s.dim * s.n_layers  # within one SwiGLU column
        assert llama.norm == "rmsnorm" and llama.mlp == "swiglu" and llama.pos == "rope"
        assert gpt2.norm == "layernorm" and gpt2.mlp == "gelu" and gpt2.pos == "learned"
        assert n_llama == sum(p.numel() for p in Llama(llama).parameters())


def test_cache_bytes_shrink_by_head_ratio():
    s = dataclasses.replace(claim.QUICK, dim=32, n_layers=1)
    mha = Llama(claim.base_config(s, 64))
    gqa = Llama(dataclasses.replace(mha.config, n_kv_heads=1))
    assert claim.cache_bytes(mha, 16) == 4 * claim.cache_bytes(gqa, 16)
    assert claim.cache_bytes(mha, 16) == 2 * 1 * 4 * 16 * 8 * 4  # k+v, layers, heads, T, head_dim, fp32


def test_with_context_keeps_weights_and_scales_low_frequencies():
    torch.manual_seed(0)
    s = dataclasses.replace(claim.QUICK, dim=32, n_layers=1, seq_len=64)
    model = Llama(claim.base_config(s, 64)).eval()
    plain, scaled = claim.with_context(model, 4, False), claim.with_context(model, 4, True)
    assert plain.config.max_seq_len == scaled.config.max_seq_len == 256
    assert scaled.config.rope_scaling.original_max_position_embeddings == 64
    x = torch.randint(0, 64, (1, 16))
    torch.testing.assert_close(plain(x), model(x))  # plain RoPE: same model on the trained length
    assert scaled.inv_freq[0] == model.inv_freq[0]  # wavelength 2 pi < 64 / 4: unchanged
    assert scaled.inv_freq[-1] == pytest.approx(model.inv_freq[-1].item() / 4)  # lowest divided by the factor


def test_judges():
    assert claim.judge_block(3.0, 3.1) == "holds" and claim.judge_block(3.2, 3.1) == "does not hold"
    gqa = {2: {"cache_ratio": 2.0, "loss": 3.02}, 1: {"cache_ratio": 4.0, "loss": 3.05}}
    assert claim.judge_gqa(3.0, gqa, 4, 0.02) == "holds"
    assert claim.judge_gqa(3.0, gqa, 4, 0.01) == "does not hold"
    ppl = {("plain", 1): 10.0, ("scaled", 1): 10.0, ("plain", 2): 30.0, ("scaled", 2): 20.0}
    assert claim.judge_long(ppl, (1, 2)) == "holds"
    assert claim.judge_long({**ppl, ("scaled", 2): 40.0}, (1, 2)) == "inconclusive"
    b, a = MarginReport(-1.0, 0.4, [-1.0, -2.0, 0.0]), MarginReport(0.5, 0.7, [1.0, 0.5, -0.1])
    assert claim.reward_accuracy(b.margins, a.margins) == pytest.approx(2 / 3)
    assert claim.judge_dpo(b, a) == "inconclusive"  # 2 of 3 pairs is within a coin flip's noise
    assert claim.judge_dpo(a, b) == "does not hold"
    n = 100
    b, a = MarginReport(0.0, 0.5, [0.0] * n), MarginReport(0.5, 0.6, [1.0] * 80 + [-1.0] * 20)
    assert claim.judge_dpo(b, a) == "holds"
    assert claim.overall(["holds", "holds"]) == "holds"
    assert claim.overall(["holds", "inconclusive"]) == "inconclusive"
    assert claim.overall(["inconclusive", "does not hold"]) == "does not hold"


def test_run_end_to_end_on_tiny_settings(tmp_path, monkeypatch):
    tiny = dataclasses.replace(
        claim.QUICK,
        max_chars=60_000,
        vocab_size=320,
        dim=16,
        n_heads=4,
        n_layers=1,
        seq_len=16,
        batch_size=4,
        steps=4,
        eval_every=2,
        final_windows=4,
        long_tokens=256,
        dpo_train_pairs=8,
        dpo_val_pairs=4,
        dpo_steps=2,
        dpo_batch_size=4,
        dpo_max_len=24,
        decode_tokens=4,
        decode_repeats=1,
    )
    monkeypatch.setattr(claim, "QUICK", tiny)
    result = claim.run(tmp_path, quick=True, seed=0)
    assert result.verdict in ("holds", "does not hold", "inconclusive")
    assert set(result.settings["verdicts"]) == {"block", "gqa", "long context", "dpo"}
    assert result.settings["verdicts"]["gqa"] in ("holds", "does not hold")  # cache ratios are exact
    assert len(result.tables) == 4
    for fig in result.figures:
        assert (tmp_path / fig.path).is_file(), fig.path
    assert (tmp_path / "llama-model" / "model.safetensors").is_file()
