"""The llama claim's pieces on tiny settings; the full claim runs in `make demo` / `notelab reproduce`."""

import dataclasses

import pytest
import torch

from notelab.lm.flops import count_parameters
from notelab.lm.model import Llama
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


@pytest.mark.parametrize("kv", [1, 2])
def test_gqa_config_keeps_the_parameter_count(kv):
    s = dataclasses.replace(claim.FULL_GPU, n_layers=2)
    mha, _ = claim.matched_pair(s, vocab_size=512)
    gqa = claim.gqa_config(mha, kv)
    assert gqa.n_kv_heads == kv and gqa.dim == mha.dim and gqa.n_heads == mha.n_heads
    assert gqa.hidden_dim > mha.hidden_dim  # the SwiGLU absorbs the K / V weights GQA drops
    assert abs(count_parameters(gqa) - count_parameters(mha)) <= 3 * s.dim * s.n_layers // 2  # half a column
    assert count_parameters(gqa) == sum(p.numel() for p in Llama(gqa).parameters())


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


def test_block_and_gqa_rules_need_seeds_and_pair_them():
    # LLaMA 3% better on each of three seeds: holds; one seed cannot decide
    assert claim.block_checks([2.91, 2.90, 2.92], [3.0, 3.0, 3.0])[0].verdict == "holds"
    assert claim.block_checks([2.9], [3.0])[0].verdict == "inconclusive"
    assert claim.block_checks([3.1, 3.11, 3.12], [3.0, 3.0, 3.0])[0].verdict == "does not hold"
    ratios = {2: 2.0, 1: 4.0}
    mha = [3.0, 3.1, 2.9]
    close = {2: [3.003, 3.1, 2.9], 1: [3.01, 3.12, 2.91]}
    checks = claim.gqa_checks(mha, close, ratios, 4, 0.02)
    assert [c.verdict for c in checks] == ["holds"] * 4
    # the H200 case of issue 9: +0.3% on one seed, +2.9% on another -> the interval straddles 2%
    spread = {2: [3.009, 3.19], 1: [3.048, 3.171]}
    verdicts = {c.name: c.verdict for c in claim.gqa_checks([3.0, 3.1], spread, ratios, 4, 0.02)}
    assert verdicts["2 kv heads: val loss GQA / MHA - 1"] == "inconclusive"
    far = {2: [3.3, 3.4, 3.2], 1: [3.3, 3.4, 3.2]}
    assert "does not hold" in [c.verdict for c in claim.gqa_checks(mha, far, ratios, 4, 0.02)]
    wrong_cache = claim.gqa_checks(mha, close, {2: 2.0, 1: 3.0}, 4, 0.02)
    assert [c.verdict for c in wrong_cache if "cache" in c.name] == ["holds", "does not hold"]


def test_long_context_rule_cannot_refute_and_needs_a_margin():
    plain = {1: [10.0, 10.0, 10.0], 2: [30.0, 31.0, 29.0], 4: [80.0, 82.0, 79.0]}
    better = {1: plain[1], 2: [20.0, 21.0, 19.5], 4: [40.0, 41.0, 39.0]}
    assert all(c.verdict == "holds" for c in claim.long_checks(plain, better, 0.01))
    # 0.3% better on every seed: real but below the 1% margin -> does not hold, counted as inconclusive
    tiny = {f: [v * 0.997 for v in vs] for f, vs in plain.items()}
    checks = claim.long_checks(plain, tiny, 0.01)
    assert [c.verdict for c in checks] == ["does not hold"] * 2
    assert all(c.effective == "inconclusive" for c in checks)
    assert claim.rules.claim_verdict(checks) == "inconclusive"


def test_dpo_rule_on_pooled_pairs():
    before = [0.0] * 100
    assert all(c.verdict == "holds" for c in claim.dpo_checks(before, [1.0] * 80 + [-1.0] * 20))
    # 2 of 3 pairs: within a coin flip's noise
    assert {c.verdict for c in claim.dpo_checks([-1.0, -2.0, 0.0], [1.0, 0.5, -0.1])} == {"inconclusive"}
    assert {c.verdict for c in claim.dpo_checks(before, [-1.0] * 80 + [1.0] * 20)} == {"does not hold"}
    assert claim.reward_accuracy([0.0, 0.0, 0.0], [1.0, -1.0, 2.0]) == pytest.approx(2 / 3)


def test_run_end_to_end_on_tiny_settings(tmp_path):
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
    tiny = dataclasses.replace(tiny, seeds=2, kv_heads=(2, 1))
    result = claim.run(tmp_path, quick=True, seed=0, settings=tiny)
    assert result.verdict in ("holds", "does not hold", "inconclusive")
    assert set(result.settings["verdicts"]) == {claim.BLOCK, claim.GQA, claim.LONG, claim.DPO}
    assert result.settings["training_seeds"] == [0, 1000]
    assert len(result.settings["llama_losses"]) == 2 and len(result.settings["gqa"]["1"]["losses"]) == 2
    cache = [c for c in result.checks if "cache" in c.name]
    assert len(cache) == len(tiny.kv_heads) and all(c.verdict == "holds" for c in cache)  # ratios are exact
    assert len(result.tables) == 4 and len(result.paper) == 3 and all(p.ours for p in result.paper)
    for fig in result.figures:
        assert (tmp_path / fig.path).is_file(), fig.path
    assert (tmp_path / "llama-model" / "model.safetensors").is_file()
