import math

import pytest

from notelab.core.errors import ConfigError
from notelab.train import TrainConfig, lr_at, lr_multiplier


def test_warmup_is_linear_then_cosine_reaches_min_at_steps():
    cfg = TrainConfig(steps=110, lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    warm = [lr_at(s, cfg) for s in range(11)]
    diffs = [b - a for a, b in zip(warm, warm[1:])]
    assert all(d == pytest.approx(1e-4) for d in diffs)  # a straight line ...
    assert warm[0] == 0.0 and warm[-1] == pytest.approx(1e-3)  # ... from 0 up to the peak at warmup_steps
    assert lr_at(60, cfg) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))  # half way: mid value
    assert lr_at(110, cfg) == pytest.approx(1e-4)  # lr * min_lr_ratio at `steps`
    assert lr_at(500, cfg) == pytest.approx(1e-4)  # and stays there
    after = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(b <= a for a, b in zip(after, after[1:]))


def test_cosine_without_warmup_starts_at_peak_and_ends_at_zero():
    cfg = TrainConfig(steps=100, lr=2.0)
    assert lr_at(0, cfg) == 2.0
    assert lr_at(25, cfg) == pytest.approx(1.0 + math.cos(math.pi / 4))
    assert lr_at(100, cfg) == pytest.approx(0.0, abs=1e-12)


def test_constant_schedule_after_warmup():
    cfg = TrainConfig(steps=50, lr=0.5, warmup_steps=4, schedule="constant")
    assert [lr_multiplier(s, cfg) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_at(49, cfg) == 0.5


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps": 0},
        {"batch_size": -1},
        {"grad_accum": 0},
        {"lr": 0.0},
        {"schedule": "linear"},
        {"min_lr_ratio": 1.5},
        {"grad_clip": 0.0},
        {"ema_decay": 1.0},
        {"precision": "fp8"},
        {"precision": "fp16"},
        {"resume": True},
        {"betas": (0.9, 1.0)},
    ],
)
def test_bad_config_is_a_config_error(kwargs):
    with pytest.raises(ConfigError):
        TrainConfig(**kwargs)


def test_matches_transformers_cosine_with_warmup():
    optimization = pytest.importorskip("transformers.optimization")
    import torch

    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = optimization.get_cosine_schedule_with_warmup(opt, num_warmup_steps=7, num_training_steps=40)
    cfg = TrainConfig(steps=40, lr=1.0, warmup_steps=7)
    for s in range(41):
        assert lr_multiplier(s, cfg) == pytest.approx(theirs.lr_lambdas[0](s), abs=1e-12)
