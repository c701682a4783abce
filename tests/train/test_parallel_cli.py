"""The shared CLI options under torchrun: --parallel, and rank 0 alone preparing --out (cli/common.py)."""

import argparse
import json
import threading

import pytest

from notelab.cli.common import MARKER, add_training_options, check_training_options, prepare_out, train_config_kwargs
from notelab.core.errors import ConfigError
from notelab.train import TrainConfig

LAUNCH = {"WORLD_SIZE": "2", "TORCHELASTIC_RUN_ID": "launch-7"}


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_training_options(p)
    return p.parse_args(["--out", "run", *argv])


def test_parallel_option_reaches_the_train_config(monkeypatch):
    for key in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(key, raising=False)
    assert TrainConfig(**train_config_kwargs(parse())).parallel == "auto"
    assert TrainConfig(**train_config_kwargs(parse("--parallel", "ddp"))).parallel == "ddp"
    with pytest.raises(SystemExit):
        parse("--parallel", "zero3")
    with pytest.raises(ConfigError, match="parallel 'fsdp': expected a run started by torchrun"):
        check_training_options(parse("--parallel", "fsdp"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    check_training_options(parse("--parallel", "fsdp"))  # under torchrun: accepted


def test_rank_zero_prepares_the_folder_and_the_others_wait_for_it(tmp_path, monkeypatch):
    for key, value in LAUNCH.items():
        monkeypatch.setenv(key, value)
    out = tmp_path / "run"
    monkeypatch.setenv("RANK", "1")
    follower = prepare_out(out, "lm train")
    assert follower.follower and not out.exists()  # rank 1 neither checks nor creates
    monkeypatch.setenv("RANK", "0")
    leader = prepare_out(out, "lm train")
    waiting = threading.Thread(target=follower.start)
    waiting.start()
    waiting.join(0.3)
    assert waiting.is_alive()  # rank 1 waits until rank 0 has started the folder
    with leader:
        waiting.join(10)
        assert not waiting.is_alive()
        assert json.loads((out / MARKER).read_text()) == {"command": "lm train", "launch": "launch-7"}
        (out / "model.safetensors").write_bytes(b"x")
    follower.finish(ok=False)  # a rank other than 0 never removes or restores anything
    assert (out / "model.safetensors").exists()
    # A later launch resumes the folder: rank 0 checks it as its own and marks it with the new launch id.
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-8")
    with prepare_out(out, "lm train", resume=True):
        assert json.loads((out / MARKER).read_text())["launch"] == "launch-8"
    with pytest.raises(ConfigError, match="already holds a 'lm train' run"):
        prepare_out(out, "lm train")


def test_a_follower_gives_up_when_rank_zero_never_starts(tmp_path, monkeypatch):
    for key, value in {**LAUNCH, "RANK": "1"}.items():
        monkeypatch.setenv(key, value)
    follower = prepare_out(tmp_path / "run", "lm train")
    with pytest.raises(ConfigError, match="rank 0 did not start"):
        follower._wait_for_leader(timeout=0.2)
