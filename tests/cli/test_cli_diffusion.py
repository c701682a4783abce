"""`notelab diffusion train | sample` end to end on embedded data: outputs, bad input, kill and resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from notelab.cli import main
from notelab.train import find_checkpoint

TINY_TRAIN = ["--steps", "4", "--batch-size", "16", "--no-progress"]


def run_cli(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse, or a main that exits instead of returning
        return e.code if isinstance(e.code, int) else 1


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "ddpm-digits"
    assert run_cli(["diffusion", "train", "--data", "digits", "--out", str(out), *TINY_TRAIN]) == 0
    return out


def test_train_writes_a_run_directory(digits_run):
    for name in ("config.json", "model.safetensors", "log.jsonl", "loss.png"):
        assert (digits_run / name).is_file(), name
    config = json.loads((digits_run / "config.json").read_text())
    assert config["model_type"] == "ddpm" and config["sample_shape"] == [1, 8, 8] and config["net"] == "unet"


def test_sample_writes_an_image_grid(digits_run, tmp_path, capsys):
    out = tmp_path / "grid.png"
    argv = ["diffusion", "sample", "--checkpoint", str(digits_run), "--sampler", "ddim", "--steps", "5"]
    assert run_cli([*argv, "--eta", "0", "--n", "16", "--out", str(out), "--device", "cpu"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG" and min(im.size) >= 4 * 8
    assert "wrote" in capsys.readouterr().out


def test_points_train_and_ddpm_sample_write_a_scatter(tmp_path):
    run = tmp_path / "moons"
    assert run_cli(["diffusion", "train", "--data", "moons", "--out", str(run), *TINY_TRAIN]) == 0
    out = tmp_path / "scatter.png"
    argv = ["diffusion", "sample", "--checkpoint", str(run), "--sampler", "ddpm", "--n", "32", "--out", str(out)]
    assert run_cli([*argv, "--device", "cpu"]) == 0
    with Image.open(out) as im:
        assert im.format == "PNG"


def _corrupt(kind: str, run: Path, tmp_path: Path) -> Path:
    bad = tmp_path / f"bad-{kind}"
    shutil.copytree(run, bad)
    if kind == "mismatch":
        config = json.loads((bad / "config.json").read_text())
        config["net_config"]["base_channels"] *= 2
        (bad / "config.json").write_text(json.dumps(config))
    else:
        weights = bad / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 3])
    return bad


@pytest.mark.parametrize(
    "case, match",
    [
        ("unknown dataset", "no_such_data"),
        ("empty image folder", "no images"),
        ("train steps 0", "--steps"),
        ("sample steps 0", "--steps: expected 1..1000"),
        ("sample steps > T", "--steps: expected 1..1000"),
        ("weights do not match config", "do not match"),
        ("truncated weights", "truncated"),
        ("no checkpoint", "checkpoint directory"),
        ("unknown sampler", "unknown sampler"),
    ],
)
def test_bad_input_is_a_one_line_error_exit_2_and_nothing_written(case, match, digits_run, tmp_path, capsys):
    out_run, out_png = tmp_path / "run", tmp_path / "grid.png"
    sample = ["diffusion", "sample", "--checkpoint", str(digits_run), "--out", str(out_png), "--n", "2"]
    train = ["diffusion", "train", "--out", str(out_run), *TINY_TRAIN]
    if case == "unknown dataset":
        argv = [*train, "--data", "no_such_data"]
    elif case == "empty image folder":
        (tmp_path / "images" / "cls").mkdir(parents=True)
        argv = [*train, "--data", str(tmp_path / "images")]
    elif case == "train steps 0":
        argv = [*train, "--data", "digits", "--steps", "0"]
    elif case == "sample steps 0":
        argv = [*sample, "--steps", "0"]
    elif case == "sample steps > T":
        argv = [*sample, "--steps", "1001"]
    elif case == "weights do not match config":
        argv = [*sample, "--checkpoint", str(_corrupt("mismatch", digits_run, tmp_path))]
    elif case == "truncated weights":
        argv = [*sample, "--checkpoint", str(_corrupt("truncate", digits_run, tmp_path))]
    elif case == "no checkpoint":
        argv = [*sample, "--checkpoint", str(tmp_path / "nowhere")]
    else:
        argv = [*sample, "--sampler", "euler"]
    capsys.readouterr()
    assert run_cli(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "\n" not in err and match in err, err
    assert not out_run.exists() and not out_png.exists()


def _env() -> dict[str, str]:
    src = str(Path(__file__).resolve().parents[2] / "src")
    path = src + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def test_python_m_notelab_reports_bad_steps_with_exit_2(digits_run, tmp_path):
    out = tmp_path / "grid.png"
    cmd = [sys.executable, "-m", "notelab", "diffusion", "sample", "--checkpoint", str(digits_run)]
    proc = subprocess.run(
        [*cmd, "--steps", "0", "--out", str(out)], capture_output=True, text=True, env=_env(), timeout=120
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--steps" in lines[0]
    assert not out.exists()


def _saved_step(state: Path) -> int:
    try:  # the checkpoint directory is swapped atomically; between renames it is briefly absent
        return int(json.loads(state.read_text()).get("step", 0))
    except (OSError, ValueError):
        return 0


def test_killed_training_resumes_and_loses_at_most_one_checkpoint_interval(tmp_path):
    run, steps, every = tmp_path / "run", 60, 10
    cmd = [sys.executable, "-m", "notelab", "diffusion", "train", "--data", "moons", "--out", str(run)]
    cmd += ["--steps", str(steps), "--batch-size", "16", "--ckpt-every", str(every), "--log-every", "1"]
    cmd += ["--no-progress", "--device", "cpu"]
    state = run / "checkpoint" / "trainer_state.json"
    log = (tmp_path / "stderr.txt").open("w")  # a file, not a pipe: a full pipe would stall the child
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if _saved_step(state) >= every:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "training ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "model.safetensors").exists()
    logged = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines() if line.endswith("}")]
    killed_at = max(logged)
    # killed between the two renames of the atomic checkpoint swap, only the aside copy exists
    saved_at = json.loads((find_checkpoint(run) / "trainer_state.json").read_text())["step"]
    assert saved_at % every == 0 and 0 <= killed_at - saved_at <= every

    resumed = subprocess.run([*cmd, "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(state.read_text())["step"] == steps
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    # the resumed log continues from the checkpoint: every step once, in order, up to the end
    assert [r["step"] for r in records] == list(range(1, steps + 1))
    assert (run / "model.safetensors").is_file() and (run / "config.json").is_file()


def test_resume_checks_the_model_config_and_a_finished_run_says_so(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["diffusion", "train", "--data", "moons", "--out", str(run), "--batch-size", "8", "--no-progress"]
    assert run_cli([*argv, "--steps", "2"]) == 0
    assert json.loads((run / "config.json").read_text())["beta_schedule"] == "linear"
    capsys.readouterr()
    assert run_cli([*argv, "--steps", "4", "--resume", "--beta-schedule", "cosine"]) == 2
    err = capsys.readouterr().err.strip()
    assert "beta_schedule 'linear', given 'cosine'" in err and "\n" not in err
    assert run_cli([*argv, "--steps", "2", "--resume"]) == 0
    assert "already complete at 2 steps" in capsys.readouterr().out
    assert run_cli([*argv, "--steps", "3", "--resume"]) == 0
    assert json.loads((run / "checkpoint" / "trainer_state.json").read_text())["step"] == 3
