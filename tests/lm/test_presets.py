"""Preset parameter counts equal the published model sizes (counted on the meta device: nothing is allocated)."""

import pytest
import torch

from notelab.core.errors import ConfigError
from notelab.lm import PRESETS, Llama, LlamaConfig, count_parameters, flops_per_token, gpt2_variant, kv_cache_bytes
from notelab.lm.flops import count_module_parameters, matmul_parameters

PUBLISHED = {
    "llama-7b": 6_738_415_616,  # LLaMA 7B (Touvron et al. 2023)
    "llama-13b": 13_015_864_320,
    "llama-33b": 32_528_943_616,
    "llama-65b": 65_285_660_672,
    "llama3-8b": 8_030_261_248,  # Meta-Llama-3-8B
    "llama3-70b": 70_553_706_496,
    "llama3.1-8b": 8_030_261_248,
    "llama3.1-70b": 70_553_706_496,
    "llama3.1-405b": 405_853_388_800,
    "llama3.2-1b": 1_235_814_400,  # tied embeddings
    "llama3.2-3b": 3_212_749_824,
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_preset_counts_match_published(name):
    config = LlamaConfig.from_name(name)
    with torch.device("meta"):
        model = Llama(config)
    assert count_module_parameters(model) == PUBLISHED[name]
    assert count_parameters(config) == PUBLISHED[name]


def test_ffn_widths_follow_llamas_rule():
    widths = {"llama-7b": 11008, "llama-65b": 22016, "llama3-8b": 14336, "llama3-70b": 28672, "llama3.1-405b": 53248}
    assert {n: LlamaConfig.from_name(n).hidden_dim for n in widths} == widths
    assert LlamaConfig.from_name("llama3.2-1b").hidden_dim == 8192


def test_llama31_scaling_and_gqa():
    c = LlamaConfig.from_name("llama3.1-8b")
    assert (c.n_kv_heads, c.rope_theta, c.vocab_size, c.max_seq_len) == (8, 500000.0, 128256, 131072)
    s = c.rope_scaling
    assert (s.factor, s.low_freq_factor, s.high_freq_factor, s.original_max_position_embeddings) == (8, 1, 4, 8192)
    assert LlamaConfig.from_name("llama3-8b").rope_scaling is None


def test_tiny_presets_and_overrides():
    c = LlamaConfig.from_name("llama3-tiny", vocab_size=300)
    assert c.vocab_size == 300 and c.n_kv_heads == 2
    assert sum(p.numel() for p in Llama(c).parameters()) == count_parameters(c)
    assert {"llama-tiny", "llama3-tiny", "llama-small"} <= set(PRESETS)


def test_unknown_preset_lists_known_names():
    with pytest.raises(ConfigError, match="llama3-8b"):
        LlamaConfig.from_name("llama-9b")
    with pytest.raises(ConfigError, match="n_kv_heads"):
        LlamaConfig(dim=64, n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match="norm"):
        LlamaConfig(norm="batchnorm")


def test_gpt2_variant_counts():
    c = gpt2_variant(LlamaConfig.from_name("llama-tiny"))
    assert (c.norm, c.mlp, c.pos, c.hidden_dim) == ("layernorm", "gelu", "learned", 4 * c.dim)
    assert sum(p.numel() for p in Llama(c).parameters()) == count_parameters(c)


def test_flops_per_token():
    c = LlamaConfig.from_name("llama3-8b")
    n = matmul_parameters(c)
    assert n == PUBLISHED["llama3-8b"] - c.vocab_size * c.dim  # the embedding lookup does no arithmetic
    assert flops_per_token(c, 2048) == 6 * n + 12 * c.n_layers * c.dim * 2048
    assert flops_per_token(c, 2048, training=False) == 2 * n + 4 * c.n_layers * c.dim * 2048
    tied = LlamaConfig.from_name("llama3.2-1b")
    assert matmul_parameters(tied) == PUBLISHED["llama3.2-1b"]  # the tied output matrix is a matmul
    # GQA: 8 kv heads of 128 in 32 layers, bf16 -> 128 KiB per token
    assert kv_cache_bytes(c, batch=1, seq_len=1) == 2 * 32 * 8 * 128 * 2
