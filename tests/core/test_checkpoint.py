import dataclasses
import fcntl
import json
import os
import stat

import pytest
import torch
from torch import nn

from notelab.core.checkpoint import PretrainedMixin, load_weights, save_weights
from notelab.core.config import config_from_dict, config_to_dict
from notelab.core.errors import CheckpointError, ConfigError
from notelab.core.io import aside_path, atomic_dir, latest_version, remove_stale_temps


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


def test_weights_get_the_same_permissions_as_the_json(tmp_path):
    old = os.umask(0o022)
    try:
        Tiny(TinyConfig()).save_pretrained(tmp_path)
        save_weights({"a": torch.ones(2)}, tmp_path / "other.safetensors")
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"config.json": 0o644, "model.safetensors": 0o644, "other.safetensors": 0o644}


@pytest.mark.parametrize("dtype", [torch.int64, torch.float64, torch.int32, torch.bool])
def test_weights_of_another_dtype_are_refused_not_cast(tmp_path, dtype):
    Tiny(TinyConfig()).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    save_weights({"emb.weight": torch.ones(11, 4).to(dtype)}, weights)
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(CheckpointError, match=f"dtype mismatch emb.weight: expected dtype float32, got {name}") as e:
        Tiny.from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_half_precision_weights_load_into_a_float32_model(tmp_path):
    m = Tiny(TinyConfig())
    m.save_pretrained(tmp_path)
    save_weights({"emb.weight": m.emb.weight.detach().bfloat16()}, tmp_path / "model.safetensors")
    loaded = Tiny.from_pretrained(tmp_path)
    assert loaded.emb.weight.dtype == torch.float32
    assert torch.equal(loaded.emb.weight, m.emb.weight.detach().bfloat16().float())


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    Tiny(TinyConfig()).save_pretrained(tmp_path)
    w = torch.zeros(11, 4)
    w[3, 1] = bad
    save_weights({"emb.weight": w}, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"expected finite weights, emb.weight holds 1 NaN/inf value"):
        Tiny.from_pretrained(tmp_path)


def test_stale_temporaries_of_dead_writers_go_live_ones_stay(tmp_path):
    target = tmp_path / "w.safetensors"
    dead = tmp_path / ".w.safetensors.0123456789ab.tmp"  # a writer killed mid-write left it
    dead.mkdir()
    (dead / "w.safetensors").write_bytes(b"half")
    legacy = tmp_path / ".w.safetensors.k3j_x9ab.tmp"  # mkstemp's file of earlier versions
    legacy.write_bytes(b"half")
    live = tmp_path / ".w.safetensors.ba9876543210.tmp"  # a writer that is still at work holds its lock
    live.mkdir()
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        save_weights({"a": torch.ones(2)}, target)
        assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "w.safetensors"]
    finally:
        os.close(fd)
    assert remove_stale_temps(tmp_path) == [live]
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]


def test_atomic_dir_cleans_up_and_keeps_one_complete_version_at_each_step(tmp_path):
    target = tmp_path / "ckpt"
    for version in ("one", "two", "three"):
        with atomic_dir(target) as d:
            (d / "x").write_text(version)
        assert latest_version(target) == target and (target / "x").read_text() == version
        assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    os.replace(target, aside_path(target))  # a crash between the two renames
    assert latest_version(target) == aside_path(target)
    with atomic_dir(target) as d:
        (d / "x").write_text("four")
    assert (target / "x").read_text() == "four" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_a_second_writer_leaves_a_live_writers_temporary_alone(tmp_path):
    target = tmp_path / "cache"
    with atomic_dir(target) as first:
        (first / "x").write_text("first")
        with atomic_dir(target) as second:  # e.g. another test worker filling the same cache
            (second / "x").write_text("second")
        assert (target / "x").read_text() == "second" and (first / "x").is_file()
    assert (target / "x").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["cache"]
