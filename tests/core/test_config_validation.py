"""Every JSON field is checked (type, range, finite), one line per error; model sizes are bounded before allocation."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest
from torch import nn

from notelab.core.checkpoint import PretrainedMixin
from notelab.core.config import config_from_dict, load_json
from notelab.core.errors import CheckpointError, ConfigError
from notelab.core.limits import allow_large_models, check_size, parameter_count
from notelab.lm import Llama, LlamaConfig


@dataclasses.dataclass
class Inner:
    factor: float = 2.0
    steps: int = 3


@dataclasses.dataclass
class Outer:
    dim: int = 4
    eps: float = 1e-5
    flag: bool = False
    name: str = "a"
    sizes: tuple[int, ...] = (2, 3)
    pair: tuple[float, float] = (0.9, 0.99)
    inner: Inner | None = None
    clip: float | None = 1.0
    mode: bool | str = "auto"


def one_line(e: pytest.ExceptionInfo) -> str:
    text = str(e.value)
    assert "\n" not in text, text
    return text


@pytest.mark.parametrize(
    "data, match",
    [
        ({"dim": "4"}, r"Outer\.dim: expected an integer, got \"4\""),
        ({"dim": 4.0}, r"Outer\.dim: expected an integer, got 4\.0"),
        ({"dim": True}, r"Outer\.dim: expected an integer, got true"),
        ({"eps": float("nan")}, r"Outer\.eps: expected a finite number, got nan"),
        ({"eps": float("inf")}, r"Outer\.eps: expected a finite number"),
        ({"eps": "1e-5"}, r"Outer\.eps: expected a number"),
        ({"flag": 1}, r"Outer\.flag: expected true/false, got 1"),
        ({"name": 3}, r"Outer\.name: expected a string, got 3"),
        ({"sizes": [1, "a"]}, r"Outer\.sizes\[1\]: expected an integer"),
        ({"sizes": 3}, r"Outer\.sizes: expected"),
        ({"pair": [0.9]}, r"Outer\.pair: expected a list of 2 values, got 1"),
        ({"inner": {"factor": "x"}}, r"Outer\.inner\.factor: expected a number"),
        ({"inner": {"nope": 1}}, r"Outer\.inner: unknown field\(s\) nope"),
        ({"inner": [1]}, r"Outer\.inner: expected a JSON object, got a list"),
        ({"clip": float("nan")}, r"Outer\.clip: expected a finite number"),
        ({"mode": 3}, r"Outer\.mode: expected true/false or a string, got 3"),
        ({"extra": 1}, r"Outer: unknown field\(s\) extra; known: dim, eps"),
    ],
)
def test_config_from_dict_checks_every_field(data, match):
    with pytest.raises(ConfigError, match=match) as e:
        config_from_dict(Outer, data)
    one_line(e)


def test_config_from_dict_converts_what_json_cannot_say():
    c = config_from_dict(Outer, {"eps": 1, "sizes": [4], "inner": {"factor": 3}, "clip": None, "mode": False})
    assert c.eps == 1.0 and isinstance(c.eps, float) and c.sizes == (4,)
    assert c.inner == Inner(factor=3.0) and c.clip is None and c.mode is False
    with pytest.raises(ConfigError, match="expected a JSON object, got a list"):
        config_from_dict(Outer, [1, 2])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "raw, match",
    [
        (b'{"norm_eps": NaN}', r"norm_eps: expected a finite number, got NaN"),
        (b'{"a": {"b": [1, -Infinity]}}', r"a\.b\[1\]: expected a finite number, got -Infinity"),
        (b'{"dim": 4', r"not valid JSON"),
        (b"", r"not valid JSON"),
        (b"[1, 2]", r"expected a JSON object, got a list"),
        (b'"text"', r"expected a JSON object, got \"text\""),
        (b'{"name": "\xff\xfe"}', r"expected UTF-8 text, got byte 0xff at offset 10"),
        (b"[" * 100_000 + b"]" * 100_000, r"not valid JSON|expected a JSON object"),
    ],
)
def test_load_json_bad_files_are_one_line(tmp_path, raw, match):
    path = tmp_path / "config.json"
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match=match) as e:
        load_json(path)
    assert one_line(e).startswith(str(path))


def test_load_json_refuses_a_file_too_big_to_be_a_config(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"x": "y" * 2000}))
    with pytest.raises(ConfigError, match="at most 1000 bytes, got 20"):
        load_json(path, max_bytes=1000)


TINY = dict(vocab_size=64, dim=16, n_layers=2, n_heads=2, multiple_of=8, max_seq_len=32)


@pytest.mark.parametrize(
    "override, match",
    [
        ({"norm_eps": float("nan")}, r"LlamaConfig\.norm_eps: expected a finite number > 0, got nan"),
        ({"norm_eps": float("inf")}, r"LlamaConfig\.norm_eps: expected a finite number > 0"),
        ({"norm_eps": 0.0}, r"LlamaConfig\.norm_eps"),
        ({"norm_eps": "1e-5"}, r"LlamaConfig\.norm_eps"),
        ({"rope_theta": float("nan")}, r"LlamaConfig\.rope_theta"),
        ({"rope_theta": -1.0}, r"LlamaConfig\.rope_theta"),
        ({"ffn_dim_multiplier": float("nan")}, r"LlamaConfig\.ffn_dim_multiplier"),
        ({"ffn_hidden_dim": 2.5}, r"LlamaConfig\.ffn_hidden_dim: expected None or an integer >= 1"),
        ({"n_kv_heads": True}, r"LlamaConfig\.n_kv_heads"),
        ({"vocab_size": 0}, r"LlamaConfig\.vocab_size: expected an integer >= 1, got 0"),
        ({"max_seq_len": 1.0e3}, r"LlamaConfig\.max_seq_len"),
        ({"dim": 17}, r"dim 17 must be a multiple of n_heads 2"),
        ({"tie_embeddings": "yes"}, r"LlamaConfig\.tie_embeddings: expected true or false"),
        ({"norm": 3}, r"unknown LlamaConfig\.norm 3"),
        ({"rope_scaling": {"factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}}, r"high_freq_factor >"),
        ({"rope_scaling": {"factor": float("nan")}}, r"rope_scaling\.factor"),
        ({"rope_scaling": {"original_max_position_embeddings": 0}}, r"original_max_position_embeddings"),
    ],
)
def test_llama_config_checks_every_field(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        LlamaConfig(**{**TINY, **override})
    one_line(e)


def test_nan_eps_in_a_saved_config_is_one_line(tmp_path):
    Llama(LlamaConfig(**TINY)).save_pretrained(tmp_path)
    text = (tmp_path / "config.json").read_text().replace('"norm_eps": 1e-05', '"norm_eps": NaN')
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=r"norm_eps: expected a finite number, got NaN") as e:
        Llama.from_pretrained(tmp_path)
    one_line(e)
    cfg = json.loads(text.replace("NaN", "1e-5"))
    cfg["n_heads"] = "2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"LlamaConfig\.n_heads: expected an integer, got \"2\""):
        Llama.from_pretrained(tmp_path)


# Each above the fixed cap of 2e10 parameters, so the bound holds on any machine.
@pytest.mark.parametrize("override", [{"n_layers": 10**6}, {"dim": 2**30, "n_heads": 2**20}, {"vocab_size": 10**10}])
def test_huge_llama_configs_fail_before_allocating(override):
    config = LlamaConfig.from_name("llama-tiny", **override)
    assert config.num_parameters() > 2e10
    t = time.perf_counter()
    with pytest.raises(
        ConfigError, match=r"parameters .* above the bound .*allow_large=True \(CLI --allow-large\)"
    ) as e:
        Llama(config)
    assert time.perf_counter() - t < 0.5
    one_line(e)
    assert check_size(config, allow_large=True) == config.num_parameters()  # the bound is liftable
    with allow_large_models():
        assert config.check_size() == config.num_parameters()


def test_huge_config_on_disk_fails_before_allocating(tmp_path):
    Llama(LlamaConfig(**TINY)).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layers"] = 10**8  # 3e11 parameters of this width
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"3\.\d+e\+11 parameters .*allow_large") as e:
        Llama.from_pretrained(tmp_path)
    assert time.perf_counter() - t < 0.5
    one_line(e)


@dataclasses.dataclass
class WideConfig:
    vocab: int = 10
    dim: int = 4


class Wide(PretrainedMixin, nn.Module):
    """A model without ``num_parameters``: the bound counts it on the meta device."""

    config_class = WideConfig
    model_type = "wide"

    def __init__(self, config: WideConfig) -> None:
        super().__init__()
        self.config = config
        self.emb = nn.Embedding(config.vocab, config.dim)


class Counted(Wide):
    model_type = "counted"
    calls: list[int] = []

    @classmethod
    def num_parameters(cls, config: WideConfig) -> int:
        cls.calls.append(1)
        return config.vocab * config.dim


def test_from_pretrained_bounds_any_model_class(tmp_path):
    Wide(WideConfig()).save_pretrained(tmp_path)
    assert parameter_count(WideConfig(), Wide) == 40
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["vocab"], cfg["dim"] = 10**7, 10**5  # 1e12 parameters: 4 TB
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=r"Wide: the config gives 1e\+12 parameters \(4e\+03 GB in float32\)"):
        Wide.from_pretrained(tmp_path)
    assert time.perf_counter() - t < 0.5
    cfg["model_type"] = "counted"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="Counted: the config gives 1e\\+12"):
        Counted.from_pretrained(tmp_path)
    assert Counted.calls


def test_from_pretrained_follows_the_enclosing_allow_large(tmp_path, monkeypatch):
    """A loader that does not pass allow_large (None) takes the CLI's --allow-large scope."""
    import notelab.core.limits as limits

    Llama(LlamaConfig(**TINY)).save_pretrained(tmp_path)
    monkeypatch.setattr(limits, "DEFAULT_MAX_PARAMETERS", 10)  # the tiny model is now "large"
    with pytest.raises(ConfigError, match="allow_large"):
        Llama.from_pretrained(tmp_path)
    with allow_large_models():
        assert isinstance(Llama.from_pretrained(tmp_path), Llama)
        with pytest.raises(ConfigError, match="allow_large"):
            Llama.from_pretrained(tmp_path, allow_large=False)  # an explicit False still wins
