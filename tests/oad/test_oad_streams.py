"""Action streams: official windows, the numpy-only unpickler, the three loaders."""

import json
import os
import pickle

import numpy as np
import pytest

from notelab.core.errors import DataError, ShapeError
from notelab.data.streams import (
    OADWindows,
    StreamSet,
    Video,
    digits_streams,
    load_npy_folder,
    load_numpy_pickle,
    load_official,
    load_streams,
    parse_ts,
    save_npy_folder,
    window_ends,
)


def official_pairs(n, enc_steps, dec_steps, seed):
    """The loop of the official TRNTHUMOSDataLayer (dataset.py), as (start, end) pairs."""
    return list(zip(range(seed, n, 1), range(seed + enc_steps, n - dec_steps, 1)))


@pytest.mark.parametrize("n,t,q,offset", [(100, 16, 4, 0), (100, 16, 4, 7), (25, 8, 8, 3), (20, 16, 8, 0)])
def test_window_ends_match_the_official_loop(n, t, q, offset):
    ends = window_ends(n, t, q, offset)
    assert [(int(e) - t, int(e)) for e in ends] == official_pairs(n, t, q, offset)


def make_set(n=40, c=4, amb=3, d=3, seed=0):
    rng = np.random.default_rng(seed)
    cls = rng.integers(0, c, n)
    return StreamSet(
        [Video("v0", rng.normal(size=(n, d)).astype(np.float32), np.eye(c, dtype=np.float32)[cls])],
        ["bg", "a", "b", "amb"],
        amb,
    ), cls


def test_windows_content_and_ambiguous_dropped():
    s, cls = make_set()
    w = OADWindows(s, 8, 3)
    ends = window_ends(40, 8, 3)
    assert [it[1] for it in w.index] == [int(e) for e in ends if cls[e - 1] != 3]
    item = w[5]
    end = item["end"]
    assert np.array_equal(item["features"].numpy(), s.videos[0].features[end - 8 : end])
    assert np.array_equal(item["label"].numpy(), s.videos[0].labels[end - 1])
    assert np.array_equal(item["future"].numpy(), s.videos[0].labels[end : end + 3])
    train = OADWindows(s, 8, 3, training=True, seed=1)
    offset = train.index[0][1] - 8
    assert 0 <= offset < 8


def test_short_video_and_mismatched_labels_are_clear_errors():
    s, _ = make_set(n=11)
    with pytest.raises(DataError, match="v0: expected at least 12 frames"):
        OADWindows(s, 8, 3)
    with pytest.raises(ShapeError, match="expected labels"):
        StreamSet([Video("x", np.zeros((5, 2), np.float32), np.zeros((5, 3), np.float32))], ["a", "b"])


class Hostile:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_numpy_only_unpickler(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = {"v": {"anno": np.eye(3), "feature_length": np.int64(3), "f": [np.float32(1.5)]}}
    (tmp_path / "good.pickle").write_bytes(pickle.dumps(good))
    back = load_numpy_pickle(tmp_path / "good.pickle")
    assert np.array_equal(back["v"]["anno"], np.eye(3)) and back["v"]["feature_length"] == 3
    (tmp_path / "bad.pickle").write_bytes(pickle.dumps({"v": Hostile()}))
    with pytest.raises(DataError, match="numpy arrays only, it asks for posix.system"):
        load_numpy_pickle(tmp_path / "bad.pickle")
    assert not (tmp_path / "pwned").exists()
    (tmp_path / "obj.pickle").write_bytes(pickle.dumps(np.array([{"a": 1}], dtype=object)))
    with pytest.raises(DataError, match="dtype object"):
        load_numpy_pickle(tmp_path / "obj.pickle")
    (tmp_path / "cls.pickle").write_bytes(pickle.dumps(StreamSet))
    with pytest.raises(DataError, match="notelab.data.streams.StreamSet"):
        load_numpy_pickle(tmp_path / "cls.pickle")
    (tmp_path / "trunc.pickle").write_bytes(pickle.dumps(good)[:50])
    with pytest.raises(DataError, match="not a readable pickle"):
        load_numpy_pickle(tmp_path / "trunc.pickle")


def write_official(tmp_path, n_classes=4, rgb=5, flow=3):
    rng = np.random.default_rng(0)
    lengths = {"vid_a": 30, "vid_b": 25, "vid_c": 40}
    feats = {v: {"rgb": rng.normal(size=(n, rgb)), "flow": rng.normal(size=(n, flow))} for v, n in lengths.items()}
    labels = {
        v: {"anno": np.eye(n_classes)[rng.integers(0, n_classes, n)], "feature_length": n} for v, n in lengths.items()
    }
    info = {
        "THUMOS": {
            "class_index": ["Background", "A", "B", "Ambiguous"][:n_classes],
            "train_session_set": ["vid_a", "vid_c"],
            "test_session_set": ["vid_b"],
        }
    }
    (tmp_path / "f.pickle").write_bytes(pickle.dumps(feats))
    (tmp_path / "l.pickle").write_bytes(pickle.dumps(labels))
    (tmp_path / "info.json").write_text(json.dumps(info))
    return feats, labels


def test_official_layout(tmp_path):
    feats, labels = write_official(tmp_path)
    s = load_official(tmp_path / "f.pickle", tmp_path / "l.pickle", tmp_path / "info.json", split="train")
    assert [v.name for v in s.videos] == ["vid_a", "vid_c"] and s.feature_dim == 8 and s.ambiguous == 3
    assert np.allclose(s.videos[1].features, np.concatenate([feats["vid_c"]["rgb"], feats["vid_c"]["flow"]], 1))
    rgb_only = load_official(tmp_path / "f.pickle", tmp_path / "l.pickle", tmp_path / "info.json", modalities=("rgb",))
    assert rgb_only.feature_dim == 5 and rgb_only.n_frames == 25
    info = json.loads((tmp_path / "info.json").read_text())
    info["THUMOS"]["test_session_set"] = ["vid_missing"]
    (tmp_path / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="vid_missing"):
        load_official(tmp_path / "f.pickle", tmp_path / "l.pickle", tmp_path / "info.json")
    write_official(tmp_path, n_classes=3)  # labels with 3 classes, data_info lists 3: fine; now break the classes
    info = json.loads((tmp_path / "info.json").read_text())
    info["THUMOS"]["class_index"].append("Extra")
    (tmp_path / "info.json").write_text(json.dumps(info))
    with pytest.raises(ShapeError, match="expected anno \\(frames, 4\\)"):
        load_official(tmp_path / "f.pickle", tmp_path / "l.pickle", tmp_path / "info.json")


def test_npy_folder_round_trip_and_errors(tmp_path):
    s, _ = make_set()
    save_npy_folder(s, tmp_path / "d")
    back = load_streams(tmp_path / "d")
    assert back.class_names == s.class_names and back.ambiguous == 3
    assert np.array_equal(back.videos[0].labels, s.videos[0].labels)
    np.save(tmp_path / "d" / "labels" / "v0.npy", np.array([0, 1, 7]))
    with pytest.raises(ShapeError, match="class ids in 0..3"):
        load_npy_folder(tmp_path / "d")
    np.save(tmp_path / "d" / "labels" / "v0.npy", np.zeros((40, 5)))
    with pytest.raises(ShapeError, match="for 4 classes"):
        load_npy_folder(tmp_path / "d")
    with pytest.raises(DataError, match="expected digits or basicmotions"):
        load_streams(tmp_path / "nothing")


def test_digits_streams_are_real_and_deterministic():
    s = digits_streams("test")
    assert s.feature_dim == 8 and s.n_classes == 7 and s.ambiguous == 6
    cls = np.concatenate([v.labels.argmax(1) for v in s.videos])
    rows = np.concatenate([v.features for v in s.videos])
    assert set(np.unique(cls)) == set(range(7))
    onset = np.tile(np.arange(8) == 0, len(cls) // 8)
    assert np.array_equal(cls == 6, onset & (cls != 0))  # ambiguous = the top row of an action digit
    assert rows.min() >= 0 and rows.max() <= 1
    assert np.array_equal(digits_streams("test").videos[3].features, s.videos[3].features)
    assert not np.array_equal(digits_streams("train").videos[0].features, s.videos[0].features)


def test_parse_ts():
    text = "#c\n@problemName X\n@data\n1,2,3:4,5,6:walking\n7,8,9:1,1,1:running\n"
    x, labels = parse_ts(text, "x.ts")
    assert x.shape == (2, 2, 3) and labels == ["walking", "running"] and x[1, 0, 2] == 9
    with pytest.raises(DataError, match="equal-length"):
        parse_ts("@data\n1,2:3:a\n", "y.ts")


class AllocateHuge:
    def __reduce__(self):
        return (np.ndarray, ((10**12,),))


def test_unpickler_refuses_allocations_and_zip_members(tmp_path):
    (tmp_path / "huge.pickle").write_bytes(pickle.dumps(AllocateHuge()))
    with pytest.raises(DataError, match="not a readable pickle"):
        load_numpy_pickle(tmp_path / "huge.pickle")
    import zipfile

    with zipfile.ZipFile(tmp_path / "a.zip", "w") as z:
        z.writestr("x_anno.pickle", pickle.dumps({"v": {"anno": np.eye(2)}}))
    assert np.array_equal(load_numpy_pickle(tmp_path / "a.zip", "x_anno.pickle")["v"]["anno"], np.eye(2))
    with pytest.raises(DataError, match="expected a member 'y.pickle'"):
        load_numpy_pickle(tmp_path / "a.zip", "y.pickle")


def test_basic_motions_from_a_ts_file(tmp_path):
    from notelab.data.streams import basic_motions_streams

    rng = np.random.default_rng(0)
    lines = ["@problemName BasicMotions", "@data"]
    for label in ["Standing", "Walking", "Running", "Badminton"] * 2:
        dims = [",".join(f"{v:.3f}" for v in rng.normal(size=10)) for _ in range(6)]
        lines.append(":".join(dims) + f":{label}")
    (tmp_path / "bm.ts").write_text("\n".join(lines) + "\n")
    s = basic_motions_streams("train", recordings_per_video=4, path=tmp_path / "bm.ts")
    assert len(s.videos) == 2 and s.feature_dim == 6 and s.videos[0].n_frames == 40 and s.ambiguous is None
    assert s.class_names[0] == "standing"  # the background
    assert set(np.concatenate([v.labels.argmax(1) for v in s.videos])) == {0, 1, 2, 3}


_BM = "datasets/data/BasicMotions/BasicMotions_TEST.ts"


def _packaged_basic_motions():
    from notelab.data.streams import find_packaged

    return find_packaged(_BM)


@pytest.mark.skipif(_packaged_basic_motions() is None, reason=f"no aeon / sktime with {_BM} installed")
def test_basic_motions_from_the_installed_package():
    """The real UEA recordings (40 per split, 6 channels x 100 steps, 10 of each activity)."""
    from notelab.data.streams import load_streams

    s = load_streams("basicmotions", "test")
    assert s.feature_dim == 6 and len(s.videos) == 5 and s.n_frames == 40 * 100
    counts = np.bincount(np.concatenate([v.labels.argmax(1) for v in s.videos]), minlength=4)
    assert counts.tolist() == [1000, 1000, 1000, 1000]
