"""`notelab diffusion train --sde`, `sample --sampler pc|em|rd|ode`, `likelihood` end to end on embedded data."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from notelab.cli import main
from notelab.diffusion import DiffusionModel

TINY = ["--steps", "4", "--batch-size", "16", "--no-progress"]


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sde")
    out = {}
    for sde in ("subvp", "ve", "none"):
        out[sde] = root / sde
        assert run_cli(["diffusion", "train", "--data", "moons", "--out", str(out[sde]), "--sde", sde, *TINY]) == 0
    return out


def test_train_records_the_sde(runs):
    config = json.loads((runs["ve"] / "config.json").read_text())
    assert config["sde"] == "ve" and config["sigma_max"] == 50.0
    model = DiffusionModel.from_pretrained(runs["subvp"])
    assert type(model.sde).__name__ == "SubVPSDE" and model.sde.beta_max == pytest.approx(20.0)


@pytest.mark.parametrize("sde", ["subvp", "ve", "none"])
@pytest.mark.parametrize("sampler, nfe", [("pc", 50), ("em", 25), ("rd", 25), ("ode", None)])
def test_sde_samplers_write_samples_and_report_nfe(runs, tmp_path, capsys, sde, sampler, nfe):
    out = tmp_path / "s.png"
    # 25 steps: the VP chain needs beta_max / steps < 1; snr 0.01: Langevin steps on an untrained net stay small
    argv = ["diffusion", "sample", "--checkpoint", str(runs[sde]), "--sampler", sampler, "--steps", "25"]
    argv += ["--snr", "0.01", "--rtol", "1e-2", "--atol", "1e-2"]
    assert run_cli([*argv, "--n", "8", "--out", str(out), "--device", "cpu"]) == 0
    assert out.is_file()
    got = int(re.search(r"NFE (\d+)", capsys.readouterr().out).group(1))
    if nfe is not None:
        assert got == nfe
    else:
        assert got >= 6  # dopri5: at least one step of 6 stages (+1 Tweedie denoising)


def test_likelihood_prints_nats(runs, capsys):
    argv = ["diffusion", "likelihood", "--checkpoint", str(runs["none"]), "--data", "moons", "--n", "8"]
    assert run_cli([*argv, "--rtol", "1e-3", "--atol", "1e-3", "--device", "cpu"]) == 0
    line = capsys.readouterr().out
    assert re.search(r"NLL -?\d+\.\d+ \+- \d+\.\d+ nats \(8 held-out", line) and "NFE" in line


def test_model_log_likelihood_float32_and_float64_states_agree(runs):
    model = DiffusionModel.from_pretrained(runs["subvp"])
    x = torch.randn(4, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = model.log_likelihood(x, rtol=1e-5, atol=1e-5)
    b = model.log_likelihood(x.float(), rtol=1e-4, atol=1e-4)
    assert a.log_p.dtype == torch.float64 and b.log_p.dtype == torch.float32
    torch.testing.assert_close(a.log_p.float(), b.log_p, rtol=2e-3, atol=2e-3)


def test_vp_chain_with_too_few_steps_is_refused(runs, tmp_path, capsys):
    argv = ["diffusion", "sample", "--checkpoint", str(runs["none"]), "--sampler", "rd", "--steps", "5"]
    assert run_cli([*argv, "--out", str(tmp_path / "x.png")]) == 2
    assert "beta_max / steps" in capsys.readouterr().err


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--sampler", "pc", "--rtol", "0"], "--rtol"),
        (["--sampler", "ode", "--ode-method", "rk45"], "rk45"),
        (["--sampler", "pc", "--n-corrector", "-1"], "--n-corrector"),
        (["--sampler", "ddim"], "ddim"),  # a VE model has no DDPM chain
        (["--sampler", "bogus"], "bogus"),
    ],
)
def test_bad_sampling_input_exits_2(runs, tmp_path, capsys, extra, match):
    argv = ["diffusion", "sample", "--checkpoint", str(runs["ve"]), "--out", str(tmp_path / "x.png"), *extra]
    assert run_cli([*argv, "--device", "cpu"]) == 2
    assert match in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "extra, match",
    [
        (["--sde", "ou"], "ou"),
        (["--sde", "ve", "--sigma-min", "5", "--sigma-max", "1"], "sigma_max"),
        (["--sde", "vp", "--beta-schedule", "cosine"], "cosine"),
        (["--sde", "vp", "--importance"], "importance"),
        (["--sde", "vp", "--prediction-type", "v_prediction"], "v_prediction"),
    ],
)
def test_bad_training_input_exits_2(tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    assert run_cli(["diffusion", "train", "--data", "moons", "--out", str(out), *extra, *TINY]) == 2
    assert match in capsys.readouterr().err
    assert not (out / "model.safetensors").exists()


def test_likelihood_bad_input_exits_2(runs, capsys):
    argv = ["diffusion", "likelihood", "--checkpoint", str(runs["none"]), "--data", "digits"]
    assert run_cli(argv) == 2
    assert "(1, 8, 8)" in capsys.readouterr().err
    assert (
        run_cli(["diffusion", "likelihood", "--checkpoint", str(runs["none"]), "--data", "moons", "--divergence", "x"])
        == 2
    )


def test_resume_with_another_sde_is_refused(runs, capsys):
    argv = ["diffusion", "train", "--data", "moons", "--out", str(runs["none"]), "--resume", "--sde", "ve"]
    assert run_cli([*argv, "--steps", "6", "--batch-size", "16", "--no-progress"]) == 2
    assert "sde 'none', given 've'" in capsys.readouterr().err


def test_notelab_sde_is_the_same_verbs_with_the_sde_notes_defaults(runs, tmp_path, capsys):
    """`notelab sde train` trains a VP model by default; `notelab sde sample` runs the PC sampler on any run,
    a `notelab diffusion` DDPM run included (one model, many samplers); `sde likelihood` scores it."""
    out = tmp_path / "vp"
    assert run_cli(["sde", "train", "--data", "moons", "--out", str(out), *TINY]) == 0
    assert json.loads((out / "config.json").read_text())["sde"] == "vp"
    for run in (out, runs["none"]):
        argv = ["sde", "sample", "--checkpoint", str(run), "--steps", "25", "--snr", "0.01", "--n", "8"]
        assert run_cli([*argv, "--out", str(tmp_path / "s.png"), "--device", "cpu"]) == 0
        assert "NFE 50" in capsys.readouterr().out  # PC: one predictor and one corrector evaluation a step
    argv = ["sde", "likelihood", "--checkpoint", str(out), "--data", "moons", "--n", "8", "--rtol", "1e-3"]
    assert run_cli([*argv, "--atol", "1e-3", "--device", "cpu"]) == 0
