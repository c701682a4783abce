"""The Llama module: shapes, KV cache == recomputation, left padding, GPT-2 variant, checkpoints, bad input."""

import pytest
import torch

from notelab.core.errors import CheckpointError, ShapeError
from notelab.core.rope import RopeScaling
from notelab.lm import Llama, LlamaConfig, gpt2_variant


def tiny(**kw) -> LlamaConfig:
    base = dict(vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, multiple_of=16, max_seq_len=64)
    return LlamaConfig(**{**base, **kw})


def model_of(config: LlamaConfig, dtype=torch.float64) -> Llama:
    torch.manual_seed(0)
    model = Llama(config).to(dtype).eval()
    with torch.no_grad():
        for p in model.parameters():  # larger than the init so that every part matters to the logits
            p.normal_(0, 0.2)
    return model


def test_forward_shape_and_parameter_names():
    model = model_of(tiny())
    x = torch.randint(0, 101, (3, 10))
    assert model(x).shape == (3, 10, 101)
    assert model(x, logits_to_keep=1).shape == (3, 1, 101)
    names = set(dict(model.named_parameters()))
    for n in ("embed_tokens.weight", "layers.1.self_attn.k_proj.weight", "layers.0.mlp.gate_proj.weight",
              "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight", "norm.weight",
              "lm_head.weight"):  # fmt: skip
        assert n in names
    assert model.layers[0].self_attn.k_proj.weight.shape == (2 * 16, 64)  # GQA: 2 kv heads of 16


def test_causal():
    model = model_of(tiny())
    x = torch.randint(0, 101, (1, 12))
    y = x.clone()
    y[0, 8:] = (y[0, 8:] + 1) % 101
    assert torch.allclose(model(x)[:, :8], model(y)[:, :8])
    assert not torch.allclose(model(x)[:, 8:], model(y)[:, 8:])


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 4, "rope_scaling": RopeScaling(4.0, 1.0, 4.0, 16)}])
def test_kv_cache_prefill_and_decode_equal_full_recompute(kw):
    model = model_of(tiny(**kw))
    x = torch.randint(0, 101, (2, 14))
    full = model(x)
    cache = model.make_cache(2, 20)
    parts = [model(x[:, :9], 0, cache=cache)] + [model(x[:, t : t + 1], t, cache=cache) for t in range(9, 14)]
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-10)


def test_static_cache_step_equals_dynamic():
    model = model_of(tiny())
    x = torch.randint(0, 101, (2, 10))
    full = model(x)
    cache = model.make_cache(2, 16)
    model(x[:, :6], 0, cache=cache)
    outs = [model(x[:, t : t + 1], torch.tensor(t), cache=cache) for t in range(6, 10)]
    assert torch.allclose(torch.cat(outs, 1), full[:, 6:], atol=1e-10)


def test_left_padding_with_row_positions_equals_unpadded():
    model = model_of(tiny())
    a = torch.randint(1, 101, (1, 7))
    b = torch.randint(1, 101, (1, 4))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 3, dtype=torch.long), b], 1)])
    mask = torch.tensor([[1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    out = model(batch, positions=positions, attention_mask=mask)
    assert torch.allclose(out[0], model(a)[0], atol=1e-10)
    assert torch.allclose(out[1, 3:], model(b)[0], atol=1e-10)
    assert torch.isfinite(out).all()


def test_gpt2_variant_is_the_same_class():
    config = gpt2_variant(tiny())
    model = model_of(config)
    assert isinstance(model.layers[0].input_layernorm, torch.nn.LayerNorm)
    assert model.embed_positions is not None and model.inv_freq.numel() == 0
    x = torch.randint(0, 101, (2, 9))
    cache = model.make_cache(2, 9)
    stepped = torch.cat(
        [model(x[:, :5], 0, cache=cache)] + [model(x[:, t : t + 1], t, cache=cache) for t in (5, 6, 7, 8)], 1
    )
    assert torch.allclose(stepped, model(x), atol=1e-10)


def test_tied_embeddings_share_storage_and_rope_stays_fp32():
    model = Llama(tiny(tie_embeddings=True))
    assert model.lm_head.weight is model.embed_tokens.weight
    model = model.to(torch.bfloat16)
    assert model.inv_freq.dtype == torch.float32 and model.lm_head.weight is model.embed_tokens.weight


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = model_of(tiny(tie_embeddings=True, rope_scaling=RopeScaling()), dtype=torch.float32)
    model.save_pretrained(tmp_path)
    again = Llama.from_pretrained(tmp_path)
    assert again.config == model.config
    x = torch.randint(0, 101, (1, 8))
    assert torch.equal(again(x), model(x))
    bigger = tiny(dim=128)
    with pytest.raises(CheckpointError, match="shape"):
        from notelab.core.checkpoint import load_state_into

        load_state_into(Llama(bigger), model.state_dict())


def test_bad_input():
    model = Llama(tiny())
    with pytest.raises(ShapeError, match="101"):
        model(torch.tensor([[1, 101]]))
    with pytest.raises(ShapeError, match="-1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(ShapeError, match="65.*64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ShapeError, match="integer"):
        model(torch.zeros(1, 5))
    cache = model.make_cache(1, 8)
    with pytest.raises(ShapeError, match="8"):
        model(torch.zeros(1, 9, dtype=torch.long), cache=cache)


def test_every_parameter_gets_a_gradient():
    model = Llama(tiny(tie_embeddings=True))
    x = torch.randint(0, 101, (2, 8))
    torch.nn.functional.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
