"""Parity with transformers' LlamaForCausalLM: from_hf / to_hf, logits to 1e-5 (fp32), greedy tokens identical."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from notelab.core.errors import CheckpointError  # noqa: E402
from notelab.lm import Llama, LlamaConfig, from_hf, generate, to_hf  # noqa: E402

VOCAB = 97  # prompts draw ids from 1: transformers masks the pad id 0 when no attention mask is given


def hf_model(n_kv_heads: int, scaled: bool, tied: bool, seed: int = 0):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if scaled:  # original context 256 with head_dim 16: the frequencies fall in all three bands of the scaling
        rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 256}  # fmt: skip
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=n_kv_heads, max_position_embeddings=512, rms_norm_eps=1e-5, rope_parameters=rope,
        tie_word_embeddings=tied, attn_implementation="eager", pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # random norms too, and large enough for decisive argmaxes
            p.normal_(0, 0.3)
    return model


def hf_greedy(model, ids: torch.Tensor, n: int, **kw) -> list[list[int]]:
    model.generation_config.eos_token_id = None  # random weights: no end-of-sequence token
    out = model.generate(ids, max_new_tokens=n, do_sample=False, pad_token_id=0, **kw)
    return out[:, ids.shape[1] :].tolist()


CASES = [(kv, scaled, tied) for kv in (4, 2) for scaled in (False, True) for tied in (False, True)]


@pytest.mark.parametrize("n_kv_heads,scaled,tied", CASES, ids=lambda v: str(v))
def test_from_hf_logits_and_greedy_tokens(tmp_path, n_kv_heads, scaled, tied):
    hf = hf_model(n_kv_heads, scaled, tied)
    hf.save_pretrained(tmp_path)
    ours = from_hf(tmp_path)
    assert ours.config.n_kv_heads == n_kv_heads and ours.config.tie_embeddings == tied
    assert (ours.config.rope_scaling is not None) == scaled
    x = torch.randint(1, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), hf(x).logits, atol=1e-5, rtol=0)
    assert generate(ours, x, 10) == hf_greedy(hf, x, 10)


def test_to_hf_loads_in_transformers_with_same_logits(tmp_path):
    torch.manual_seed(0)
    from notelab.core.rope import RopeScaling

    scaling = RopeScaling(8.0, 1.0, 4.0, 256)
    config = LlamaConfig(VOCAB, 64, 2, 4, 2, multiple_of=32, rope_scaling=scaling, max_seq_len=512, tie_embeddings=True)
    model = Llama(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    to_hf(model, tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == ["LlamaForCausalLM"] and saved["rope_scaling"]["rope_type"] == "llama3"
    assert saved["tie_word_embeddings"] is True and saved["torch_dtype"] == "float32"
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    x = torch.randint(1, VOCAB, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x), atol=1e-5, rtol=0)
    assert hf_greedy(hf, x, 8) == generate(model, x, 8)


def test_sharded_round_trip_and_missing_shard(tmp_path):
    hf = hf_model(2, True, False)
    ours = from_hf(_saved(hf, tmp_path / "hf"))
    to_hf(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    again = from_hf(tmp_path / "sharded")
    half = from_hf(tmp_path / "sharded", dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16 and half.inv_freq.dtype == torch.float32
    hf2 = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "sharded", attn_implementation="eager").eval()
    x = torch.randint(1, VOCAB, (1, 16))
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
        torch.testing.assert_close(hf2(x).logits, hf(x).logits, atol=1e-5, rtol=0)
    (tmp_path / "sharded" / shards[1]).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        from_hf(tmp_path / "sharded")


def test_left_padded_batch_and_repetition_penalty_match_transformers(tmp_path):
    hf = hf_model(2, False, False)
    ours = from_hf(_saved(hf, tmp_path))
    prompts = [[5, 9, 13, 2, 7, 40, 41], [8, 3, 77]]
    ids = torch.tensor([prompts[0], [0] * 4 + prompts[1]])
    mask = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])
    assert generate(ours, prompts, 8) == hf_greedy(hf, ids, 8, attention_mask=mask)
    x = torch.tensor([prompts[0]])
    assert generate(ours, x, 12, repetition_penalty=1.8) == hf_greedy(hf, x, 12, repetition_penalty=1.8)


def _saved(hf, path):
    hf.save_pretrained(path)
    return path


def test_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="config.json"):
        from_hf(tmp_path / "nowhere")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(CheckpointError, match="gpt2"):
        from_hf(gpt2)
    good = _saved(hf_model(2, False, False), tmp_path / "good")
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["intermediate_size"] = 128
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="shape mismatch.*128"):
        from_hf(bad)
    (bad / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_hf(bad)
    with pytest.raises(CheckpointError, match="layout"):
        from notelab.lm import gpt2_variant

        to_hf(Llama(gpt2_variant(LlamaConfig.from_name("llama-tiny"))), tmp_path / "x")
