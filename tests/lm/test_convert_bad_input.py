"""``from_hf`` on malformed Hugging Face folders: one-line errors, nothing read outside the folder or allocated."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch
from safetensors.torch import load_file, save_file

from notelab.core.errors import CheckpointError
from notelab.lm import Llama, LlamaConfig, from_hf, to_hf

TINY = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=1, multiple_of=8, max_seq_len=32)


@pytest.fixture
def hf_dir(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "hf"
    to_hf(Llama(LlamaConfig(**TINY)), path)
    return path


@pytest.fixture
def sharded_dir(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "sharded"
    to_hf(Llama(LlamaConfig(**TINY)), path, max_shard_bytes=4000)
    assert (path / "model.safetensors.index.json").is_file()
    return path


def fails(path, match, error=CheckpointError):
    with pytest.raises(error, match=match) as e:
        from_hf(path)
    assert "\n" not in str(e.value), str(e.value)
    return str(e.value)


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        if v is KeyError:
            cfg.pop(k)
        else:
            cfg[k] = v
    (path / "config.json").write_text(json.dumps(cfg))


def test_the_fixture_loads(hf_dir, sharded_dir):
    assert from_hf(hf_dir).config.n_layers == 2 and from_hf(sharded_dir).config.dim == 16


@pytest.mark.parametrize(
    "raw, match",
    [
        (b"{not json", r"config\.json: not valid JSON"),
        (b"[1, 2, 3]", r"config\.json: expected a JSON object, got a list"),
        (b'{"model_type": "llama", "hidden_size": "\xff"}', r"config\.json: expected UTF-8 text"),
        (b'{"model_type": "llama", "rms_norm_eps": NaN}', r"rms_norm_eps: expected a finite number, got NaN"),
    ],
)
def test_unreadable_config_json(hf_dir, raw, match):
    (hf_dir / "config.json").write_bytes(raw)
    fails(hf_dir, match)


@pytest.mark.parametrize(
    "changes, match",
    [
        ({"hidden_size": KeyError}, r"expected the Llama config key 'hidden_size', found none"),
        ({"hidden_size": "16"}, r"hidden_size: expected an integer >= 1, got '16'"),
        ({"hidden_size": 16.5}, r"hidden_size: expected an integer >= 1, got 16\.5"),
        ({"num_hidden_layers": True}, r"num_hidden_layers: expected an integer >= 1, got True"),
        ({"num_hidden_layers": 0}, r"num_hidden_layers: expected an integer >= 1, got 0"),
        ({"vocab_size": [64]}, r"vocab_size: expected an integer >= 1"),
        ({"rms_norm_eps": "small"}, r"rms_norm_eps: expected a finite number > 0"),
        ({"rms_norm_eps": -1e-5}, r"rms_norm_eps: expected a finite number > 0"),
        ({"rope_theta": 0}, r"rope_theta: expected a finite number > 0"),
        ({"rope_scaling": "llama3"}, r"rope_scaling: expected an object"),
        (
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
            r"rope_scaling: expected the Llama config key 'low_freq_factor'",
        ),
        ({"tie_word_embeddings": "no"}, r"tie_word_embeddings: expected true or false"),
        ({"num_key_value_heads": 3}, r"n_heads 2 must be a multiple of n_kv_heads 3"),
        ({"model_type": "gpt2", "architectures": "LlamaForCausalLM"}, r"expected a Llama checkpoint"),
    ],
)
def test_malformed_config_fields(hf_dir, changes, match):
    edit_config(hf_dir, **changes)
    fails(hf_dir, match)


def test_a_huge_config_fails_before_reading_or_allocating(hf_dir):
    edit_config(hf_dir, num_hidden_layers=10**8)
    t = time.perf_counter()
    msg = fails(hf_dir, r"parameters .*above the bound .*allow_large=True")
    assert time.perf_counter() - t < 1.0 and "config.json" in msg


@pytest.mark.parametrize(
    "weight_map, match",
    [
        (["model.norm.weight"], r"expected a non-empty object 'weight_map'"),
        ({}, r"expected a non-empty object 'weight_map'"),
        ({"model.norm.weight": 5}, r"expected a shard file name, got 5"),
        ({"model.norm.weight": ""}, r"expected a shard file name"),
    ],
)
def test_malformed_shard_index(sharded_dir, weight_map, match):
    (sharded_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    fails(sharded_dir, match)


def test_unreadable_shard_index(sharded_dir):
    (sharded_dir / "model.safetensors.index.json").write_bytes(b'{"weight_map": ')
    fails(sharded_dir, r"model\.safetensors\.index\.json: not valid JSON")


def _point_index_at(path, shard):
    index = json.loads((path / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = shard
    (path / "model.safetensors.index.json").write_text(json.dumps(index))


def test_shard_paths_must_stay_inside_the_folder(sharded_dir, tmp_path):
    real = sorted(sharded_dir.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes(real.read_bytes())  # a readable file: only the path rule can refuse it
    _point_index_at(sharded_dir, "../outside.safetensors")
    fails(sharded_dir, r"shard '\.\./outside\.safetensors' leaves the checkpoint directory")
    _point_index_at(sharded_dir, str(outside))
    fails(sharded_dir, r"outside\.safetensors' leaves the checkpoint directory")
    os.symlink(outside, sharded_dir / "link.safetensors")
    _point_index_at(sharded_dir, "link.safetensors")
    fails(sharded_dir, r"shard 'link\.safetensors' is a link that leaves the checkpoint directory")


def test_a_single_weights_file_that_links_outside_is_refused(hf_dir, tmp_path):
    outside = tmp_path / "elsewhere.safetensors"
    os.replace(hf_dir / "model.safetensors", outside)
    os.symlink(outside, hf_dir / "model.safetensors")
    fails(hf_dir, r"is a link that leaves the checkpoint directory")


def test_corrupt_shards(hf_dir, sharded_dir):
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    fails(hf_dir, r"model\.safetensors: not a readable safetensors file")
    weights.write_bytes(b"\xff" * 64)
    fails(hf_dir, r"model\.safetensors: not a readable safetensors file")
    shard = sorted(sharded_dir.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-7])
    fails(sharded_dir, r"model-\d+-of-\d+\.safetensors: not a readable safetensors file")


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64])
def test_weights_of_a_wrong_dtype_are_refused(hf_dir, dtype):
    weights = hf_dir / "model.safetensors"
    state = load_file(weights)
    state["model.norm.weight"] = state["model.norm.weight"].to(dtype)
    save_file(state, weights)
    name = str(dtype).removeprefix("torch.")
    fails(hf_dir, rf"model\.norm\.weight: expected dtype float32, float16 or bfloat16, got {name}")


def test_non_finite_weights_are_refused(hf_dir):
    weights = hf_dir / "model.safetensors"
    state = load_file(weights)
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(state, weights)
    fails(hf_dir, r"expected finite weights, model\.layers\.0\.mlp\.up_proj\.weight holds NaN")
