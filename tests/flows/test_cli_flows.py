"""`notelab flows train | sample | likelihood` end to end on embedded data, and bad input."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from notelab.cli import main

TINY = ["--steps", "5", "--batch-size", "32", "--hidden", "16", "--no-progress"]


def run_cli(argv):
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


@pytest.fixture(scope="module")
def fm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flows") / "fm-moons"
    assert run_cli(["flows", "train", "--model", "fm", "--data", "moons", "--n", "256", "--out", str(out), *TINY]) == 0
    return out


def test_train_sample_and_likelihood_on_points(fm_run, tmp_path, capsys):
    assert json.loads((fm_run / "flow.json").read_text())["model"] == "fm"
    png = tmp_path / "s.png"
    argv = ["flows", "sample", "--checkpoint", str(fm_run), "--solver", "euler", "--steps", "3"]
    assert run_cli([*argv, "--n", "64", "--out", str(png), "--device", "cpu"]) == 0
    assert "3 network evaluations" in capsys.readouterr().out
    with Image.open(png) as im:
        assert im.format == "PNG"
    argv = ["flows", "eval", "--checkpoint", str(fm_run), "--data", "moons", "--n", "100", "--solver", "rk4"]
    assert run_cli([*argv, "--steps", "4", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "log-likelihood" in out and "true density" in out


def test_nice_on_digits_reports_bits_per_dim(tmp_path, capsys):
    run = tmp_path / "nice"
    assert run_cli(["flows", "train", "--model", "nice", "--data", "digits", "--out", str(run), *TINY]) == 0
    assert json.loads((run / "flow.json").read_text())["n_bins"] == 17
    argv = ["flows", "likelihood", "--checkpoint", str(run), "--data", "digits", "--max-examples", "64"]
    assert run_cli([*argv, "--device", "cpu"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    png = tmp_path / "grid.png"
    assert run_cli(["flows", "sample", "--checkpoint", str(run), "--n", "16", "--out", str(png)]) == 0


def test_realnvp_on_digits_is_the_multiscale_flow_and_reports_bits_per_dim(tmp_path, capsys):
    run = tmp_path / "realnvp"
    tiny = ["--steps", "3", "--batch-size", "32", "--hidden", "4", "--depth", "1", "--no-progress", "--no-compile"]
    assert run_cli(["flows", "train", "--model", "realnvp", "--data", "digits", "--out", str(run), *tiny]) == 0
    assert json.loads((run / "config.json").read_text())["arch"] == "multiscale"
    argv = ["flows", "likelihood", "--checkpoint", str(run), "--data", "digits", "--max-examples", "32"]
    assert run_cli([*argv, "--device", "cpu"]) == 0
    assert "bits/dim" in capsys.readouterr().out
    # without --hidden / --depth the conv conditioners get the CPU-sized defaults, the MLP ones theirs
    small = ["--steps", "1", "--batch-size", "16", "--no-progress", "--no-compile"]
    assert (
        run_cli(["flows", "train", "--model", "realnvp", "--data", "digits", "--out", str(tmp_path / "d"), *small]) == 0
    )
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert (config["arch"], config["hidden"], config["depth"]) == ("multiscale", 32, 1)
    argv = ["flows", "train", "--model", "realnvp", "--arch", "mlp", "--data", "digits", "--out", str(tmp_path / "m")]
    assert run_cli([*argv, *small]) == 0
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (config["arch"], config["hidden"], config["depth"]) == ("mlp", 128, 3)
    bad = ["flows", "train", "--model", "fm", "--arch", "multiscale", "--data", "digits", "--out", str(tmp_path / "x")]
    assert run_cli([*bad, *tiny]) == 2
    assert "applies to nice and realnvp" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_bad_input_is_one_line_and_exit_2(fm_run, tmp_path, capsys):
    cases = [
        ["flows", "sample", "--checkpoint", str(fm_run), "--n", "0", "--out", str(tmp_path / "a.png")],
        ["flows", "sample", "--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "a.png")],
        ["flows", "likelihood", "--checkpoint", str(fm_run), "--data", "digits", "--device", "cpu"],
        ["flows", "train", "--model", "nice", "--data", "moons", "--n-bins", "17", "--out", str(tmp_path / "r"), *TINY],
        ["flows", "train", "--model", "nice", "--data", "moons", "--out", str(tmp_path / "r2"), "--steps", "0"],
    ]
    for argv in cases:
        capsys.readouterr()
        assert run_cli(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err
    assert not (tmp_path / "r").exists() and not (tmp_path / "r2").exists()
