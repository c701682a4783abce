import dataclasses
import json

import pytest
import torch
from torch import nn

from notelab.core.checkpoint import PretrainedMixin, load_weights, save_weights
from notelab.core.config import config_from_dict, config_to_dict
from notelab.core.errors import CheckpointError, ConfigError
from notelab.core.io import atomic_dir


@dataclasses.dataclass
class TinyConfig:
    vocab: int = 11
    dim: int = 4
    sizes: tuple[int, ...] = (2, 3)


class Tiny(PretrainedMixin, nn.Module):
    config_class = TinyConfig
    model_type = "tiny"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab, config.dim)
        self.head = nn.Linear(config.dim, config.vocab, bias=False)
        self.head.weight = self.emb.weight  # tied


def test_round_trip_keeps_weights_ties_and_config(tmp_path):
    m = Tiny(TinyConfig())
    m.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    assert data["model_type"] == "tiny" and data["sizes"] == [2, 3]
    assert set(load_weights(tmp_path / "model.safetensors")) == {"emb.weight"}  # the tie is stored once
    m2 = Tiny.from_pretrained(tmp_path)
    assert m2.config == m.config and m2.config.sizes == (2, 3)
    assert torch.equal(m2.head.weight, m.emb.weight) and m2.head.weight is m2.emb.weight


def test_truncated_weights_are_a_checkpoint_error(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-20])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        Tiny.from_pretrained(tmp_path)


def test_weights_not_matching_the_config(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["dim"] = 5
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"shape mismatch emb.weight: config gives \(11, 5\), file has \(11, 4\)"):
        Tiny.from_pretrained(tmp_path)


def test_wrong_model_type_and_missing_dir(tmp_path):
    Tiny(TinyConfig()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "unet"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="expected model_type 'tiny'"):
        Tiny.from_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="found none"):
        Tiny.from_pretrained(tmp_path / "nope")


def test_config_unknown_field_names_known_ones():
    with pytest.raises(ConfigError, match="unknown field.*dimm; known: vocab, dim, sizes"):
        config_from_dict(TinyConfig, {"dimm": 3})
    assert config_to_dict(TinyConfig()) == {"vocab": 11, "dim": 4, "sizes": [2, 3]}


def test_save_weights_is_atomic_on_failure(tmp_path):
    path = tmp_path / "w.safetensors"
    save_weights({"a": torch.ones(2)}, path)
    with pytest.raises(AttributeError):
        save_weights({"a": "not a tensor"}, path)  # type: ignore[dict-item]
    assert torch.equal(load_weights(path)["a"], torch.ones(2))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_atomic_dir_keeps_the_old_version_when_writing_fails(tmp_path):
    target = tmp_path / "ckpt"
    with atomic_dir(target) as d:
        (d / "x").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "x").write_text("half")
            raise RuntimeError("crash mid-write")
    assert (target / "x").read_text() == "old"
    with atomic_dir(target) as d:
        (d / "x").write_text("new")
    assert (target / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
