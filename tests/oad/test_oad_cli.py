"""``notelab oad train|eval|stream`` end to end on the embedded digits streams, and its one-line errors."""

import io

import numpy as np
import pytest

from notelab.cli import main
from notelab.data.streams import StreamSet, Video, digits_streams, save_npy_folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("oad") / "run"
    code = main(
        [
            "oad",
            "train",
            "--model",
            "oadtr",
            "--preset",
            "tiny",
            "--steps",
            "3",
            "--batch-size",
            "8",
            "--out",
            str(out),
            "--no-progress",
            "--log-every",
            "1",
        ]
    )
    assert code == 0
    return out


def test_train_eval_stream(trained, tmp_path, capsys, monkeypatch):
    assert (trained / "model.safetensors").is_file() and (trained / "config.json").is_file()
    assert main(["oad", "eval", "--checkpoint", str(trained), "--model", "oadtr"]) == 0
    line = capsys.readouterr().out
    assert "per-frame mAP" in line and "future-step mAP" in line
    feats = digits_streams("test").videos[0].features[:6]
    np.save(tmp_path / "f.npy", feats)
    assert main(["oad", "stream", "--checkpoint", str(trained), "--input", str(tmp_path / "f.npy")]) == 0
    rows = capsys.readouterr().out.strip().splitlines()
    assert len(rows) == 7 and rows[0].startswith("frame\ttop")
    probs = np.array([[float(v) for v in r.split("\t")[2:]] for r in rows[1:]])
    assert probs.shape == (6, 6) and np.allclose(probs.sum(1), 1, atol=1e-3)
    text = "\n".join(" ".join(str(v) for v in row) for row in feats) + "\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(text))
    assert main(["oad", "stream", "--checkpoint", str(trained)]) == 0
    assert capsys.readouterr().out.strip().splitlines() == rows


def test_bad_input_exits_2(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin", io.StringIO("1 2 3\n"))
    assert main(["oad", "stream", "--checkpoint", str(trained)]) == 2
    assert "expected 8 features for this model, got 3" in capsys.readouterr().err
    rng = np.random.default_rng(0)
    names = ["background", "zero", "one", "two", "three", "four", "ambiguous"]
    wide = StreamSet(
        [Video("w", rng.random((40, 9), dtype=np.float32), np.eye(7, dtype=np.float32)[np.zeros(40, int)])], names, 6
    )
    save_npy_folder(wide, tmp_path / "wide")
    assert main(["oad", "eval", "--checkpoint", str(trained), "--data", str(tmp_path / "wide")]) == 2
    assert "expects 8-d frame features, the data has 9" in capsys.readouterr().err
    few = StreamSet(
        [Video("f", rng.random((40, 8), dtype=np.float32), np.eye(5, dtype=np.float32)[np.zeros(40, int)])],
        names[:4] + ["ambiguous"],
        4,
    )
    save_npy_folder(few, tmp_path / "few")
    assert main(["oad", "eval", "--checkpoint", str(trained), "--data", str(tmp_path / "few")]) == 2
    assert "the model has 7 classes, the labels have 5" in capsys.readouterr().err
    short = StreamSet(
        [Video("short", rng.random((9, 8), dtype=np.float32), np.eye(7, dtype=np.float32)[np.zeros(9, int)])], names, 6
    )
    save_npy_folder(short, tmp_path / "short")
    out = tmp_path / "never"
    code = main(
        [
            "oad",
            "train",
            "--model",
            "trn",
            "--preset",
            "tiny",
            "--data",
            str(tmp_path / "short"),
            "--out",
            str(out),
            "--steps",
            "2",
        ]
    )
    assert code == 2 and "short: expected at least 11 frames" in capsys.readouterr().err
    assert not out.exists()
    assert main(["oad", "train", "--model", "resnet", "--out", str(out)]) == 2
    assert "unknown model 'resnet'" in capsys.readouterr().err


def test_official_pickles_train_and_eval(tmp_path, capsys):
    from test_oad_streams import write_official

    write_official(tmp_path)
    data = [
        "--features-pickle",
        str(tmp_path / "f.pickle"),
        "--labels-pickle",
        str(tmp_path / "l.pickle"),
        "--data-info",
        str(tmp_path / "info.json"),
    ]
    out = tmp_path / "run"
    code = main(
        [
            "oad",
            "train",
            "--model",
            "gru",
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--out",
            str(out),
            "--no-progress",
            *data,
        ]
    )
    assert code == 0 and "on thumos-train" in capsys.readouterr().out
    assert main(["oad", "eval", "--checkpoint", str(out), "--device", "cpu", *data]) == 0
    assert "thumos-test:" in capsys.readouterr().out
    assert main(["oad", "eval", "--checkpoint", str(out), *data[:2]]) == 2
    assert "expected all three" in capsys.readouterr().err
