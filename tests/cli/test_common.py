"""notelab.cli.common: run folders, thread count, one-line errors, lazy imports, the Makefile's stamp."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from notelab.cli import main
from notelab.cli.common import (
    MARKER,
    cgroup_cpu_limit,
    check_text,
    prepare_out,
    run_verb,
    set_threads,
    usable_cores,
)
from notelab.core.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def _env() -> dict[str, str]:
    path = str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ------------------------------------------------------------------------------------- lazy imports


def test_help_does_not_import_torch():
    code = (
        "import sys, notelab.cli\n"
        "assert 'torch' not in sys.modules, 'import notelab.cli imported torch'\n"
        "from notelab.core import ConfigError\n"  # the package's names still import
        "assert 'torch' not in sys.modules, 'notelab.core imported torch'\n"
        "assert notelab.cli.main(['--help']) == 0\n"
        "assert notelab.cli.main(['lm', 'train', '--help']) == 0\n"
        "assert 'torch' not in sys.modules, 'notelab --help imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    from notelab.core import EMA, seed_everything

    assert callable(seed_everything) and EMA.__name__ == "EMA"


# -------------------------------------------------------------------------------------- run folders


def test_prepare_out_refuses_files_and_other_runs(tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ConfigError, match="expected a folder, got the file"):
        prepare_out(f, "lm train")
    with pytest.raises(ConfigError, match="is a file"):
        prepare_out(f / "sub" / "run", "lm train")
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="--overwrite"):
        prepare_out(other, "lm train")
    with pytest.raises(ConfigError, match="expected a 'lm train' run"):
        prepare_out(other, "lm train", resume=True)
    (other / MARKER).write_text(json.dumps({"command": "diffusion train"}))
    with pytest.raises(ConfigError, match="'diffusion train' run"):
        prepare_out(other, "lm train", resume=True)
    assert not prepare_out(tmp_path / "empty-to-be", "lm train").replace
    # nothing was created by the checks
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "other"]


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write anywhere")
def test_prepare_out_refuses_a_folder_it_cannot_create(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(ConfigError, match="no write permission"):
            prepare_out(locked / "run", "lm train")
    finally:
        locked.chmod(0o700)


def test_overwrite_replaces_the_folder_whole_and_restores_it_on_failure(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "loss.png").write_text("old run")
    folder = prepare_out(out, "lm train", overwrite=True)
    with pytest.raises(RuntimeError), folder:
        (out / "half.txt").write_text("new, unfinished")
        raise RuntimeError("crash")
    assert sorted(p.name for p in out.iterdir()) == ["loss.png"]  # the old run is back, untouched
    with prepare_out(out, "lm train", overwrite=True):
        (out / "model.safetensors").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "model.safetensors"])
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # nothing of the old run left beside it


def test_cli_out_errors_are_one_line_before_any_work(tmp_path, capsys):
    f = tmp_path / "file.txt"
    f.write_text("x")
    train = ["diffusion", "train", "--data", "moons", "--steps", "1", "--batch-size", "4", "--no-progress"]
    assert main([*train, "--out", str(f)]) == 2
    assert "file" in _one_line_error(capsys)
    assert main([*train, "--out", str(f / "run")]) == 2
    _one_line_error(capsys)
    # another verb's run is refused, then replaced whole with --overwrite
    run = tmp_path / "run"
    seq = ["seq", "train", "--model", "gru", "--task", "copy", "--length", "3", "--steps", "1", "--batch-size", "4"]
    seq += ["--d-model", "8", "--layers", "1", "--no-progress", "--out", str(run)]
    assert main(seq) == 0
    capsys.readouterr()
    assert main([*train, "--out", str(run)]) == 2
    assert "'seq train' run" in _one_line_error(capsys)
    assert main([*train, "--out", str(run), "--resume"]) == 2
    _one_line_error(capsys)
    assert main([*train, "--out", str(run), "--overwrite"]) == 0
    assert not (run / "task.json").exists()
    assert json.loads((run / MARKER).read_text())["command"] == "diffusion train"
    assert json.loads((run / "config.json").read_text())["model_type"] == "ddpm"


# ------------------------------------------------------------------------------------------ threads


def _cgroup(tmp_path: Path, line: str, files: dict[str, str]) -> tuple[Path, Path]:
    proc = tmp_path / "proc_cgroup"
    proc.write_text(line + "\n")
    root = tmp_path / "sys"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text + "\n")
    return proc, root


@pytest.mark.parametrize(
    ("line", "files", "cores"),
    [
        ("0::/job", {"job/cpu.max": "150000 100000"}, 2),  # 1.5 cores of quota: 2 threads
        ("0::/a/job", {"a/job/cpu.max": "max 100000", "a/cpu.max": "100000 100000"}, 1),  # a parent's limit
        ("0::/job", {"job/cpu.max": "max 100000"}, None),
        ("0::/job", {"job/cpu.max": "garbage"}, None),
        ("4:cpu,cpuacct:/docker/x", {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "300000"}, None),  # no period file
        (
            "4:cpu,cpuacct:/docker/x",
            {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "300000", "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000"},
            3,
        ),
        (
            "4:cpu,cpuacct:/docker/x",
            {"cpu,cpuacct/docker/x/cpu.cfs_quota_us": "-1", "cpu,cpuacct/docker/x/cpu.cfs_period_us": "100000"},
            None,
        ),
    ],
)
def test_cgroup_cpu_limit_from_a_fake_cgroup(tmp_path, line, files, cores):
    proc, root = _cgroup(tmp_path, line, files)
    assert cgroup_cpu_limit(proc, root) == cores


def test_usable_cores_takes_the_smaller_of_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    proc, root = _cgroup(tmp_path, "0::/job", {"job/cpu.max": "200000 100000"})
    assert usable_cores(proc, root) == 2
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    assert usable_cores(proc, root) == 1
    assert usable_cores(tmp_path / "missing", tmp_path / "nothing") == 1


def test_set_threads_only_lowers_the_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert set_threads(cores=64) == 2 and torch.get_num_threads() == 2
        assert set_threads(cores=1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "exc",
    [
        PermissionError(13, "Permission denied", "/x/model.safetensors"),
        IsADirectoryError(21, "Is a directory", "/x"),
        UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
        ConfigError("--steps: expected a positive number, got 0"),
    ],
)
def test_run_verb_turns_expected_failures_into_one_line_exit_2(exc, capsys):
    def verb(args):
        raise exc

    assert run_verb(verb, None) == 2
    _one_line_error(capsys)


def test_non_utf8_text_is_a_one_line_error(capsys):
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")  # what argv holds for non-UTF-8 bytes
    with pytest.raises(ConfigError, match=r"--prompt: expected UTF-8 text, got the bytes b'\\xe9' at character 3"):
        check_text("--prompt", bad)
    assert main(["seq", "translate", "--checkpoint", "nowhere", "--input", bad]) == 2
    assert "UTF-8" in _one_line_error(capsys)


# ----------------------------------------------------------------------------------------- Makefile


def _make_plan(tmp: Path, *args: str) -> str:
    proc = subprocess.run(["make", "-n", "-C", str(tmp), *args, "demo"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_makefile_reinstalls_when_torch_spec_changes(tmp_path):
    for name in ("Makefile", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / ".venv").mkdir()
    plan = _make_plan(tmp_path, "TORCH_SPEC=torch==9.9")
    assert 'pip install -q "torch==9.9"' in plan
    stamp = next(line.split()[-1] for line in plan.splitlines() if line.startswith("touch "))
    (tmp_path / stamp).touch()  # as if that install had run
    assert "pip install" not in _make_plan(tmp_path, "TORCH_SPEC=torch==9.9")
    assert 'pip install -q "torch"' in _make_plan(tmp_path, "TORCH_SPEC=torch")


# ----------------------------------------------------------------------------------- shared options


@pytest.mark.parametrize(
    "argv",
    [
        ["lm", "train", "--out", "r"],
        ["lm", "sft", "--checkpoint", "c", "--out", "r"],
        ["lm", "dpo", "--checkpoint", "c", "--out", "r"],
        ["diffusion", "train", "--data", "moons", "--out", "r"],
        ["seq", "train", "--model", "gru", "--task", "copy", "--out", "r"],
    ],
)
def test_every_training_verb_takes_the_shared_options(argv):
    from notelab.cli import build_parser
    from notelab.cli.common import train_config_kwargs
    from notelab.train import TrainConfig

    shared = ["--steps", "7", "--batch-size", "3", "--lr", "0.01", "--seed", "9", "--device", "cpu"]
    shared += ["--ckpt-every", "2", "--log-every", "1", "--resume", "--no-progress", "--no-compile", "--allow-large"]
    args = build_parser().parse_args([*argv, *shared])
    assert args.allow_large and args.overwrite is False
    config = TrainConfig(**train_config_kwargs(args))
    assert (config.steps, config.batch_size, config.lr, config.seed, config.device) == (7, 3, 0.01, 9, "cpu")
    assert (config.ckpt_every, config.log_every, config.resume, config.progress, config.compile) == (
        2,
        1,
        True,
        False,
        False,
    )
    assert config.out_dir == "r"


def test_an_output_file_that_cannot_be_written_is_refused_before_any_work(tmp_path, capsys):
    from notelab.cli.common import check_out_file

    with pytest.raises(ConfigError, match="expected a file path, got the folder"):
        check_out_file(tmp_path)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_out_file(blocker / "grid.png")
    assert check_out_file(tmp_path / "new" / "grid.png") == tmp_path / "new" / "grid.png"
    # the CLI says so before it reads the checkpoint (which does not exist here)
    argv = ["diffusion", "sample", "--checkpoint", str(tmp_path / "none"), "--out", str(blocker / "grid.png")]
    assert main(argv) == 2
    assert "is a file" in _one_line_error(capsys)


def test_a_reader_that_closes_the_pipe_ends_the_verb_quietly():
    """`notelab ... | head`: no traceback, no "error: [Errno 32]" line, exit 141 (128 + SIGPIPE)."""
    code = (
        "import argparse, sys\n"
        "from notelab.cli.common import run_verb\n"
        "def verb(args):\n"
        "    while True:\n"
        "        print('x' * 100, flush=True)\n"
        "sys.exit(run_verb(verb, argparse.Namespace()))\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert p.stdout.readline().strip() == b"x" * 100
    p.stdout.close()  # the reader goes away
    rc = p.wait(timeout=30)
    assert rc == 141
    assert p.stderr.read() == b""
