"""notelab.seq's factory (equal-size models), training glue and probes on tiny configs."""

from __future__ import annotations

import pytest
import torch

from notelab.core.errors import CheckpointError, ConfigError
from notelab.seq.factory import MODELS, build_model, count_params, load_model
from notelab.seq.probes import decay_rate, input_gradient_norms, train_throughput
from notelab.seq.tasks import SyntheticTask
from notelab.seq.training import evaluate, train_seq, translate
from notelab.train import TrainConfig


def test_models_have_matched_parameter_counts() -> None:
    counts = {m: count_params(build_model(m, 50, 32, d_model=32, n_layers=1)) for m in MODELS}
    ref = counts["transformer"]
    for m in ("lstm", "gru", "rnn"):
        assert abs(counts[m] - ref) / ref < 0.05, counts
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("mamba", 50, 32)


def test_vanilla_rnn_gradients_vanish_with_distance() -> None:
    torch.manual_seed(0)
    slopes = {}
    for m in ("rnn", "transformer"):
        norms = input_gradient_norms(build_model(m, 23, 24, d_model=32, n_layers=1, dropout=0.0), 24, batch_size=4)
        assert norms.shape == (24,) and bool((norms >= 0).all())
        slopes[m] = decay_rate(norms[1:])
    assert slopes["rnn"] < slopes["transformer"]
    assert slopes["rnn"] < -0.05  # at least 10x smaller every 20 positions


def test_decay_rate_of_a_geometric_sequence() -> None:
    assert decay_rate(torch.tensor([1.0, 0.1, 0.01, 0.001])) == pytest.approx(-1.0)


def test_train_throughput_is_positive() -> None:
    models = {m: build_model(m, 23, 16, d_model=16, n_layers=1, dropout=0.0) for m in ("gru", "transformer")}
    rates = train_throughput(models, 8, 4, repeats=1)
    assert set(rates) == {"gru", "transformer"} and all(r > 0 for r in rates.values())


def test_train_save_load_translate_round_trip(tmp_path) -> None:
    task = SyntheticTask("copy", 4, batch_size=16)
    config = TrainConfig(steps=60, batch_size=16, lr=1e-2, warmup_steps=5, progress=False, log_every=20)
    run = train_seq("transformer", task, tmp_path, config, d_model=32, n_layers=1, dropout=0.0)
    assert run.steps == 60 and run.history[-1]["loss"] < run.history[0]["loss"]
    scores = evaluate(run.model, task, n_examples=32)
    assert 0.0 <= scores["exact_match"] <= scores["token_acc"] <= 1.0 and scores["token_acc"] > 0.2
    loaded = load_model(tmp_path)
    src = task.sample(3, torch.Generator().manual_seed(1))[0]
    tgt = task.sample(3, torch.Generator().manual_seed(1))[1]
    assert torch.allclose(loaded(src, tgt), run.model(src, tgt), atol=1e-6)
    out = translate(tmp_path, "3 4 5 6")
    assert all(0 <= int(i) < task.vocab for i in out.split())
    with pytest.raises(CheckpointError):
        load_model(tmp_path / "nothing")


def test_time_budget_stops_training() -> None:
    task = SyntheticTask("reverse", 4, batch_size=4)
    config = TrainConfig(steps=100_000, batch_size=4, progress=False, log_every=1000)
    run = train_seq("lstm", task, None, config, d_model=16, n_layers=1, time_budget=0.5)
    assert 1 <= run.steps < 100_000 and run.seconds < 30
