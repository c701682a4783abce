"""`notelab vq train | reconstruct | train-prior | sample` end to end on digits; bad input: exit 2, one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from notelab.cli import main

TINY = ["--steps", "3", "--batch-size", "16", "--no-progress", "--device", "cpu"]
NET = ["--hidden", "8", "--res-blocks", "1", "--code-dim", "4", "--codebook-size", "8"]


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vqcli")
    vq, prior = root / "vq", root / "prior"
    assert run_cli(["vq", "train", "--data", "digits", "--out", str(vq), *TINY, *NET]) == 0
    assert (
        run_cli(["vq", "train-prior", "--vqvae", str(vq), "--out", str(prior), *TINY, "--dim", "16", "--steps", "30"])
        == 0
    )
    return vq, prior


def test_train_and_prior_write_run_folders(runs):
    vq, prior = runs
    for name in ("config.json", "model.safetensors", "data.json", "log.jsonl"):
        assert (vq / name).is_file(), name
    config = json.loads((vq / "config.json").read_text())
    assert config["model_type"] == "vqvae" and config["codebook_size"] == 8 and config["ema"] is True
    assert json.loads((prior / "config.json").read_text())["vocab_size"] == 9  # K + the start token


def test_sample_and_reconstruct(runs, tmp_path, capsys):
    vq, prior = runs
    out = tmp_path / "s.png"
    assert run_cli(["vq", "sample", "--vqvae", str(vq), "--prior", str(prior), "--n", "4", "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG"
    recon = tmp_path / "r.png"
    argv = ["vq", "reconstruct", "--vqvae", str(vq), "--prior", str(prior), "--n-bins", "16", "--out", str(recon)]
    assert run_cli([*argv, "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "reconstruction MSE" in text and "bits/dim" in text and recon.is_file()


def test_the_issues_verb_names_and_no_others(capsys):
    for verb in ("train", "reconstruct", "train-prior", "sample"):
        assert run_cli(["vq", verb, "--help"]) == 0
    for old in ("prior", "eval"):
        assert run_cli(["vq", old, "--vqvae", "x"]) == 2  # argparse: invalid choice
        assert "invalid choice" in capsys.readouterr().err


def test_resume_of_a_finished_run_says_so(runs, capsys):
    vq, _ = runs
    assert run_cli(["vq", "train", "--data", "digits", "--out", str(vq), *TINY, *NET, "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["vq", "train", "--data", "digits", "--codebook", "kmeans"], "--codebook"),
        (["vq", "train", "--data", "digits", "--codebook-size", "1"], "codebook_size"),
        (["vq", "train", "--data", "moons"], "expected images"),
        (["vq", "train", "--data", "digits", "--downsample", "3"], "power of 2"),
    ],
)
def test_bad_training_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "run"
    assert run_cli([*argv, "--out", str(out), *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err
    assert not out.exists()


def test_bad_sampling_input(runs, tmp_path, capsys):
    vq, prior = runs
    base = ["vq", "sample", "--vqvae", str(vq), "--prior", str(prior)]
    assert run_cli([*base, "--n", "0", "--out", str(tmp_path / "a.png")]) == 2
    assert run_cli([*base, "--out", str(tmp_path / "a.jpg")]) == 2
    # a prior that does not belong to the VQ-VAE: its vocabulary is K + 1 of another codebook
    assert (
        run_cli(["vq", "sample", "--vqvae", str(prior), "--prior", str(prior), "--out", str(tmp_path / "b.png")]) == 2
    )
    assert "model_type" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_colour_images_from_a_npy_array(tmp_path, capsys):
    import numpy as np

    arr = np.random.default_rng(0).integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)  # channels last
    np.save(tmp_path / "imgs.npy", arr)
    run = tmp_path / "vq"
    argv = ["vq", "train", "--data", str(tmp_path / "imgs.npy"), "--out", str(run), *TINY, *NET, "--downsample", "4"]
    assert run_cli(argv) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["in_channels"] == 3 and config["image_size"] == 16
    assert run_cli(["vq", "reconstruct", "--vqvae", str(run), "--device", "cpu"]) == 0
    assert "reconstruction MSE" in capsys.readouterr().out


def _weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


def _same(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_seed_gives_bit_identical_weights(tmp_path):
    # dead-code restart draws from the global RNG, EMA buffers live in the checkpoint: both must be reproduced
    base = ["vq", "train", "--data", "digits", *NET, "--batch-size", "16", "--no-progress", "--device", "cpu"]
    runs = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        assert run_cli([*base, "--steps", "6", "--seed", str(seed), "--out", str(tmp_path / name)]) == 0
        runs[name] = _weights(tmp_path / name)
    assert _same(runs["a"], runs["b"]) and not _same(runs["a"], runs["c"])


class _Stop(Exception):
    pass


def test_resume_after_an_interruption_equals_one_run(tmp_path):
    import torch

    from notelab.data import load_dataset
    from notelab.train import TrainConfig
    from notelab.vq import VQVAEConfig, fit_vqvae

    x = load_dataset("digits", split="train").x
    config = VQVAEConfig(hidden=8, res_blocks=1, code_dim=4, codebook_size=8, dead_code_threshold=2.0)

    def tc(out: Path, resume: bool = False) -> TrainConfig:
        return TrainConfig(
            steps=6, batch_size=16, ckpt_every=3, device="cpu", progress=False, out_dir=str(out), resume=resume
        )

    whole = fit_vqvae(x, config, tc(tmp_path / "whole")).model.state_dict()

    def stop(step: int, logs: dict) -> None:
        if step == 4:
            raise _Stop

    with pytest.raises(_Stop):
        fit_vqvae(x, config, tc(tmp_path / "cut"), (stop,))
    resumed = fit_vqvae(x, config, tc(tmp_path / "cut", resume=True)).model.state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
