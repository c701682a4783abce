"""Training every flow through notelab.train.fit on the embedded data: it learns, its density is
normalised, and the run folder reloads to the same model."""

import pytest
import torch

from notelab.core.errors import CheckpointError, ConfigError
from notelab.data import load_dataset
from notelab.flows.continuous import Solver
from notelab.flows.train import FlowSpec, build_model, draw, load_flow, log_likelihood, train_flow
from notelab.train import TrainConfig

RK4 = Solver("rk4", steps=6)


def _config(steps):
    return TrainConfig(steps=steps, batch_size=128, lr=3e-3, progress=False, log_every=1000)


@pytest.fixture(scope="module")
def moons():
    return load_dataset("moons", n=1024, seed=0).x, load_dataset("moons", n=256, seed=1).x


def _grid_mass(model, lim=7.0, n=121):
    g = torch.linspace(-lim, lim, n)
    xx = torch.stack(torch.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    return float(log_likelihood(model, xx, RK4, batch=8192).exp().sum() * (2 * lim / (n - 1)) ** 2)


@pytest.mark.parametrize(
    "name, extra",
    [("nice", {}), ("realnvp", {}), ("fm", {}), ("fm", {"path": "vp", "pairing": "ot"}), ("rf", {}), ("cnf", {})],
)
def test_training_raises_test_likelihood_and_the_density_integrates_to_one(name, extra, moons):
    train, test = moons
    spec = FlowSpec(model=name, hidden=24, solver_steps=2, reflow_pairs=256, **extra)
    torch.manual_seed(0)
    untrained = build_model(spec, (2,)).eval()
    model, results = train_flow(spec, train, _config(40 if name == "cnf" else 150))
    assert len(results) == (2 if name == "rf" else 1)
    before = float(log_likelihood(untrained, test, RK4).mean())
    after = float(log_likelihood(model, test, RK4).mean())
    assert after > before + 0.2, (before, after)
    assert abs(_grid_mass(model) - 1) < 0.01


def test_run_folder_round_trip_and_digits_bits_per_dim(tmp_path):
    digits = load_dataset("digits", split="train").x[:256]
    spec = FlowSpec(model="nice", n_bins=17, hidden=32)
    model, _ = train_flow(spec, digits, _config(20), out_dir=tmp_path)
    again, spec2 = load_flow(tmp_path)
    assert spec2 == spec
    x = digits[:8] * 0.99
    torch.testing.assert_close(again.log_prob(x), model.log_prob(x))
    samples, nfe = draw(again, 4, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (4, 1, 8, 8) and nfe == 1
    assert (tmp_path / "log.jsonl").is_file()


def test_bad_specs_and_folders(tmp_path):
    with pytest.raises(ConfigError, match="unknown flow model"):
        FlowSpec(model="glow")
    with pytest.raises(ConfigError, match="unknown probability path"):
        FlowSpec(model="fm", path="ve")
    with pytest.raises(CheckpointError, match="flow.json"):
        load_flow(tmp_path)


def test_flow_matching_on_digits_gives_finite_bits_per_dim():
    from notelab.eval import bits_per_dim
    from notelab.flows.dequantize import dequantize

    digits = load_dataset("digits", split="train").x[:128]
    model, _ = train_flow(FlowSpec(model="fm", n_bins=17), digits, _config(3))
    x = dequantize(digits[:4], 17, torch.Generator().manual_seed(0))
    with torch.no_grad():
        log_p = model.log_prob(x, Solver("rk4", steps=2), method="hutchinson", generator=torch.Generator())
    bpd = bits_per_dim(log_p, 64, 17)
    assert torch.isfinite(bpd).all() and (bpd > 0).all()
    samples, nfe = draw(model, 2, Solver("euler", steps=2))
    assert samples.shape == (2, 1, 8, 8) and nfe == 2
