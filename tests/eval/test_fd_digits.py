"""FD-digits: the cached classifier (accuracy, determinism, cache recovery) and the distance itself."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from notelab.core.errors import ShapeError
from notelab.core.runtime import cache_dir
from notelab.data import load_dataset
from notelab.eval import (
    DigitsClassifierConfig,
    digits_accuracy,
    digits_classifier,
    digits_features,
    fd_digits,
)
from notelab.eval.digits import _MEMO


def test_classifier_is_accurate_and_cached():
    model = digits_classifier()
    test = load_dataset("digits", split="test")
    assert digits_accuracy(test.x, test.y) > 0.95
    path = cache_dir() + "/digits_classifier"
    assert json.load(open(path + "/config.json"))["model_type"] == "digits_classifier"
    assert digits_classifier() is model  # memoised in-process
    _MEMO.clear()
    reloaded = digits_classifier()
    assert reloaded is not model
    for a, b in zip(model.state_dict().values(), reloaded.state_dict().values()):
        assert torch.equal(a, b)


def test_corrupt_cache_is_retrained(tmp_path):
    good = digits_classifier()
    cache = tmp_path / "clf"
    shutil.copytree(Path(cache_dir()) / "digits_classifier", cache)
    (cache / "model.safetensors").write_bytes(b"garbage, not safetensors")
    _MEMO.clear()
    model = digits_classifier(cache)
    test = load_dataset("digits", split="test")
    assert (model(test.x).argmax(1) == test.y).float().mean().item() > 0.95
    # Retraining is deterministic: the same weights as the first training.
    for a, b in zip(good.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    assert (cache / "model.safetensors").read_bytes()[:8] != b"garbage,"


def test_stale_recipe_is_not_reused(tmp_path, monkeypatch):
    good = digits_classifier()
    cache = tmp_path / "clf"
    shutil.copytree(Path(cache_dir()) / "digits_classifier", cache)
    cfg = json.loads((cache / "config.json").read_text())
    cfg["steps"] = 1
    (cache / "config.json").write_text(json.dumps(cfg))
    _MEMO.clear()
    calls = []
    monkeypatch.setattr("notelab.eval.digits.train_digits_classifier", lambda c: calls.append(c) or good)
    assert digits_classifier(cache) is good
    assert calls == [DigitsClassifierConfig()]
    assert json.loads((cache / "config.json").read_text())["steps"] == DigitsClassifierConfig().steps


def test_fd_digits_small_for_real_large_for_noise():
    train = load_dataset("digits", split="train").x
    test = load_dataset("digits", split="test").x
    real = fd_digits(test, train)
    assert fd_digits(test, test) == pytest.approx(0.0, abs=1e-6)
    noise = fd_digits(torch.rand(500, 1, 8, 8) * 2 - 1)
    blurred = fd_digits(torch.nn.functional.avg_pool2d(test, 3, 1, 1))
    assert real < 50 and noise > 20 * real
    assert real < fd_digits(test) * 3 and real < blurred < noise
    assert digits_features(test[:5]).shape == (5, 64)


def test_bad_input():
    with pytest.raises(ShapeError, match=r"expected digit images of shape \(N, 1, 8, 8\)"):
        fd_digits(torch.zeros(10, 1, 16, 16))
    with pytest.raises(ShapeError, match="finite"):
        fd_digits(torch.full((10, 1, 8, 8), float("nan")))
