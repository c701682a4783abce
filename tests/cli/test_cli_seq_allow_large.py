"""``notelab seq train`` / ``seq translate`` and the size bound: checked before anything is allocated or
written, lifted by ``--allow-large`` (passed through to loading, as in ``notelab lm``)."""

from __future__ import annotations

import time

import pytest

import notelab.core.limits
from notelab.cli import main

TRAIN = ["seq", "train", "--model", "gru", "--task", "reverse", "--length", "4", "--steps", "2", "--batch-size", "4",
         "--d-model", "8", "--layers", "1", "--no-progress"]  # fmt: skip


@pytest.fixture
def small_bound(monkeypatch):
    monkeypatch.setattr(notelab.core.limits, "size_bound", lambda nbytes: (100, "a bound of 100 for the test"))


def test_translate_passes_allow_large_to_loading(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    assert main([*TRAIN, "--out", str(run)]) == 0
    monkeypatch.setattr(notelab.core.limits, "size_bound", lambda nbytes: (100, "a bound of 100 for the test"))
    capsys.readouterr()
    translate = ["seq", "translate", "--checkpoint", str(run), "--input", "3 4 5 6"]
    assert main(translate) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "above the bound" in err[0] and "--allow-large" in err[0]
    assert main([*translate, "--allow-large"]) == 0
    assert all(tok.isdigit() for tok in capsys.readouterr().out.split())


def test_train_checks_the_size_before_writing(tmp_path, capsys, small_bound):
    assert main([*TRAIN, "--out", str(tmp_path / "a")]) == 2
    assert "above the bound" in capsys.readouterr().err and not (tmp_path / "a").exists()
    assert main([*TRAIN, "--out", str(tmp_path / "b"), "--allow-large"]) == 0
    assert (tmp_path / "b" / "model.safetensors").is_file()


@pytest.mark.parametrize("model, width, layers", [("transformer", 2**20, 1), ("lstm", 2**18, 2)])
def test_a_huge_config_is_one_line_not_an_allocation(tmp_path, capsys, model, width, layers):
    args = ["seq", "train", "--model", model, "--task", "copy", "--d-model", str(width), "--layers", str(layers)]
    t0 = time.perf_counter()
    assert main([*args, "--steps", "1", "--out", str(tmp_path / "big"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "parameters" in err[0] and "above the bound" in err[0]
    assert time.perf_counter() - t0 < 10 and not (tmp_path / "big").exists()
