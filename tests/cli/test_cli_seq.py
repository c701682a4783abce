"""`notelab seq train` / `notelab seq translate` end to end, and their one-line errors."""

from __future__ import annotations

import pytest

from notelab.cli import main


def test_train_then_translate(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = [
        "seq",
        "train",
        "--model",
        "gru",
        "--task",
        "reverse",
        "--length",
        "5",
        "--steps",
        "5",
        "--batch-size",
        "8",
        "--d-model",
        "16",
        "--layers",
        "1",
        "--out",
        str(out),
        "--no-progress",
    ]
    assert main(args) == 0
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file() and (out / "task.json").is_file()
    assert "trained gru" in capsys.readouterr().out
    assert main(["seq", "translate", "--checkpoint", str(out), "--input", "3 4 5 6 7", "--beam", "2"]) == 0
    printed = capsys.readouterr().out.split()
    assert 1 <= len(printed) <= 6 and all(p.isdigit() for p in printed)

    for bad_input, message in [("", "non-empty"), ("3 4 999", "token ids"), (" ".join(["3"] * 40), "max_len")]:
        assert main(["seq", "translate", "--checkpoint", str(out), "--input", bad_input]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "mamba", "--task", "copy"], "unknown model"),
        (["--model", "lstm", "--task", "sort"], "unknown task"),
        (["--model", "lstm", "--task", "copy", "--length", "0"], "--length"),
        (["--model", "lstm", "--task", "copy", "--length", "100000"], "--length"),
        (["--model", "transformer", "--task", "copy", "--d-model", "6"], "divisible"),
        (["--model", "gru", "--task", "copy", "--device", "tpu"], "device"),
        (["--model", "gru", "--task", "stdlib-doc", "--vocab-size", "0"], "--vocab-size"),
    ],
)
def test_train_bad_input_exits_2(tmp_path, capsys, args, message) -> None:
    out = tmp_path / "run"
    assert main(["seq", "train", *args, "--out", str(out), "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err
    assert not out.exists()


def test_translate_missing_checkpoint(tmp_path, capsys) -> None:
    assert main(["seq", "translate", "--checkpoint", str(tmp_path / "none"), "--input", "3 4"]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{oops", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"task": "sort", "length": 5}', "task: expected one of"),
        ('{"task": "reverse", "name": "reverse", "length": "5", "batch_size": 8, "n_symbols": 10}', "length"),
        ('{"task": "reverse", "name": "reverse", "length": 5, "batch_size": 0, "n_symbols": 10}', "batch_size"),
        ('{"task": "reverse", "name": "reverse", "length": 5, "batch_size": 8, "n_symbols": true}', "n_symbols"),
        ('{"task": "reverse", "length": 5, "colour": "red"}', "unknown field"),
    ],
)
def test_corrupt_task_json_is_one_line_exit_2(tmp_path, capsys, text, message) -> None:
    out = tmp_path / "run"
    args = ["seq", "train", "--model", "gru", "--task", "reverse", "--length", "5", "--steps", "1"]
    assert (
        main([*args, "--batch-size", "8", "--d-model", "8", "--layers", "1", "--out", str(out), "--no-progress"]) == 0
    )
    (out / "task.json").write_text(text)
    capsys.readouterr()
    assert main(["seq", "translate", "--checkpoint", str(out), "--input", "3 4 5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and err.count("\n") == 1, err


def test_resume_checks_the_task_and_a_finished_run_says_so(tmp_path, capsys) -> None:
    out = tmp_path / "run"
    args = ["seq", "train", "--model", "gru", "--task", "reverse", "--steps", "2", "--batch-size", "8"]
    args += ["--d-model", "8", "--layers", "1", "--out", str(out), "--no-progress"]
    assert main([*args, "--length", "5"]) == 0
    capsys.readouterr()
    assert main([*args, "--length", "5", "--resume"]) == 0
    assert "already complete at 2 steps" in capsys.readouterr().out
    assert main([*args, "--length", "6", "--resume", "--steps", "4"]) == 2
    err = capsys.readouterr().err
    assert "length 5" in err and "given 6" in err
