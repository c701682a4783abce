"""Action streams for online action detection: videos of per-frame features with per-frame labels.

A video is ``features`` ``(F, D)`` and one-hot (or multi-hot) ``labels`` ``(F, C)``; class 0 is the
background and, when the data set has one, the ``ambiguous`` class marks frames that are not to
be scored or trained on (THUMOS'14: column 21 of 22).

Windows, exactly as the OadTR / TRN data layer builds them (``dataset.py``): with ``T`` past
frames and ``Q`` future steps, a video of ``F`` frames gives, for ``offset`` 0 (evaluation) or a
random ``offset`` in ``[0, T)`` drawn once per video (training)::

    end   = offset + T, offset + T + 1, ..., F - Q - 1        (stride 1)
    input = features[end - T : end]        the current frame is features[end - 1]
    label = labels[end - 1]                windows whose current frame is ambiguous are dropped
    future = labels[end : end + Q]

Sources: (a) the official pickle layout (``{video: {'rgb', 'flow'}}`` features,
``{video: {'anno', 'feature_length'}}`` labels, ``data_info`` splits), read with
:func:`load_numpy_pickle`, which accepts numpy arrays and plain containers only; (b) a folder of
``features/<video>.npy`` + ``labels/<video>.npy`` (+ ``classes.json``); (c) real recordings that
ship with installed packages: :func:`digits_streams` (scikit-learn's handwritten digits written
row by row, the default) and :func:`basic_motions_streams` (the UEA BasicMotions accelerometer /
gyroscope recordings, read from an installed aeon or sktime).
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import pickle
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from notelab.core.errors import ConfigError, DataError, ShapeError, unknown_name


@dataclass
class Video:
    name: str
    features: np.ndarray  # (F, D) float32
    labels: np.ndarray  # (F, C) float32, one-hot or multi-hot

    @property
    def n_frames(self) -> int:
        return int(self.features.shape[0])


@dataclass
class StreamSet:
    """Videos sharing a feature dimension and a class list."""

    videos: list[Video]
    class_names: list[str]
    ambiguous: int | None = None  # column of the ambiguous class, if any
    name: str = "streams"
    background: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.videos:
            raise DataError(f"{self.name}: expected at least one video, got none")
        c = len(self.class_names)
        if self.ambiguous is not None and not 0 <= self.ambiguous < c:
            raise ConfigError(f"{self.name}: ambiguous class {self.ambiguous} is not one of the {c} classes")
        d = self.videos[0].features.shape[1] if self.videos[0].features.ndim == 2 else None
        for v in self.videos:
            if v.features.ndim != 2 or v.features.shape[1] != d:
                raise ShapeError(f"{self.name}/{v.name}: expected features (frames, {d}), got {v.features.shape}")
            if v.labels.shape != (v.features.shape[0], c):
                raise ShapeError(
                    f"{self.name}/{v.name}: expected labels ({v.features.shape[0]}, {c}) (frames, classes), "
                    f"got {v.labels.shape}"
                )

    @property
    def feature_dim(self) -> int:
        return int(self.videos[0].features.shape[1])

    @property
    def n_classes(self) -> int:
        return len(self.class_names)

    @property
    def n_frames(self) -> int:
        return sum(v.n_frames for v in self.videos)


# ---------------------------------------------------------------------------------------------- windows


def window_ends(n_frames: int, window: int, n_future: int, offset: int = 0) -> np.ndarray:
    """The ``end`` of every window of a video (module docstring): ``offset + T .. F - Q - 1``."""
    return np.arange(offset + window, n_frames - n_future, dtype=np.int64)


def check_long_enough(streams: StreamSet, window: int, n_future: int) -> None:
    """A video needs ``T + Q + 1`` frames for one window; a shorter one is named in a :class:`DataError`."""
    need = window + n_future + 1
    for v in streams.videos:
        if v.n_frames < need:
            raise DataError(
                f"{streams.name}/{v.name}: expected at least {need} frames (window {window} + {n_future} future "
                f"+ 1), got {v.n_frames}"
            )


class OADWindows(Dataset):
    """Stride-1 windows of ``window`` past frames with the current label and ``n_future`` next labels.

    ``training=True`` draws each video's offset in ``[0, window)`` from ``seed`` (the official data
    layer draws it once per video). Items are dicts: ``features`` ``(T, D)``, ``label`` ``(C,)``,
    ``future`` ``(Q, C)``, ``video`` and ``end`` (the index after the current frame).
    """

    def __init__(
        self, streams: StreamSet, window: int, n_future: int, *, training: bool = False, seed: int = 0
    ) -> None:
        if window < 1 or n_future < 0:
            raise ConfigError(f"windows: expected window >= 1 and n_future >= 0, got {window} and {n_future}")
        check_long_enough(streams, window, n_future)
        self.streams, self.window, self.n_future = streams, window, n_future
        rng = np.random.default_rng(seed)
        self._features = [torch.from_numpy(np.ascontiguousarray(v.features, dtype=np.float32)) for v in streams.videos]
        self._labels = [torch.from_numpy(np.ascontiguousarray(v.labels, dtype=np.float32)) for v in streams.videos]
        index = []
        for i, v in enumerate(streams.videos):
            offset = int(rng.integers(window)) if training else 0
            ends = window_ends(v.n_frames, window, n_future, offset)
            if streams.ambiguous is not None:
                ends = ends[v.labels[ends - 1].argmax(axis=1) != streams.ambiguous]
            index.extend((i, int(e)) for e in ends)
        if not index:
            raise DataError(f"{streams.name}: no window has a non-ambiguous current frame")
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        v, end = self.index[i]
        return {
            "features": self._features[v][end - self.window : end],
            "label": self._labels[v][end - 1],
            "future": self._labels[v][end : end + self.n_future],
            "video": v,
            "end": end,
        }


# ------------------------------------------------------------------------------ numpy-only unpickling


def _reconstruct(_subtype: object, shape: tuple, dtype: object) -> np.ndarray:
    # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') followed by BUILD with the data;
    # the subtype is fixed to ndarray and the placeholder kept empty whatever the file asks for.
    if not isinstance(shape, tuple) or any(not isinstance(s, int) or s > 1 for s in shape):
        raise DataError(f"pickle: expected numpy's empty placeholder array, got shape {shape!r}")
    return np.ndarray.__new__(np.ndarray, shape, np.dtype(dtype))


class _NdarrayMarker:
    """What the pickle gets for ``numpy.ndarray``: an argument for ``_reconstruct``, never a callable."""


def _allowed_globals() -> dict[tuple[str, str], Any]:
    try:  # numpy >= 2 moved numpy.core to numpy._core (pickles name either)
        from numpy._core import multiarray
    except ImportError:
        from numpy.core import multiarray

    out: dict[tuple[str, str], Any] = {}
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        out[(mod, "_reconstruct")] = _reconstruct
        out[(mod, "scalar")] = multiarray.scalar
    out[("numpy", "ndarray")] = _NdarrayMarker
    out[("numpy", "dtype")] = np.dtype
    return out


class NumpyOnlyUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays / scalars and plain containers, and nothing else.

    ``find_class`` is the only way a pickle reaches code; it answers for numpy's array
    reconstruction and ``dtype`` alone and refuses every other global (``os.system``,
    ``builtins.eval``, any class) with a :class:`DataError` before anything runs.
    """

    def __init__(self, file: io.BufferedIOBase, source: str) -> None:
        super().__init__(file)
        self.source = source
        self.allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise DataError(
                f"{self.source}: expected a pickle of numpy arrays only, it asks for {module}.{name}"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self.source}: expected a pickle of numpy arrays only, it holds a persistent id")


def _check_plain(obj: Any, source: str, path: str = "") -> None:
    """Refuse anything but dict / list / tuple / str / numbers and numpy arrays without objects."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, source, path)
            _check_plain(v, source, f"{path}/{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, source, f"{path}[{i}]")
    elif isinstance(obj, (np.ndarray, np.generic)):
        if obj.dtype.hasobject:
            raise DataError(f"{source}: expected numeric numpy arrays, {path or 'the root'} has dtype object")
    elif not isinstance(obj, (str, bytes, int, float, bool, type(None))):
        raise DataError(f"{source}: expected numpy arrays and plain containers, {path} is {type(obj).__name__}")


def load_numpy_pickle(path: str | os.PathLike, member: str | None = None) -> Any:
    """Read a pickle (or ``member`` of a zip archive) that may hold only numpy arrays and containers."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a pickle file at {path}, found none")
    source = f"{path}:{member}" if member else str(path)
    try:
        if member is not None:
            with zipfile.ZipFile(path) as z:
                if member not in z.namelist():
                    raise DataError(f"{path}: expected a member {member!r}, the archive has {z.namelist()}")
                data = z.read(member)
        else:
            data = path.read_bytes()
        obj = NumpyOnlyUnpickler(io.BytesIO(data), source).load()
    except DataError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, zipfile.BadZipFile) as e:
        raise DataError(f"{source}: not a readable pickle of numpy arrays ({type(e).__name__}: {e})") from e
    _check_plain(obj, source)
    return obj


# --------------------------------------------------------------------------------- (a) official layout


def _data_info(path: str | os.PathLike, dataset: str) -> dict[str, Any]:
    try:
        info = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: expected the data_info JSON of the OadTR repository ({e})") from e
    if dataset not in info:
        raise unknown_name("data set in data_info", dataset, info)
    return info[dataset]


def labels_from_annotations(annotations: Any, sessions: Sequence[str], n_classes: int, source: str) -> list[np.ndarray]:
    """The ``anno`` arrays ``(F, C)`` of ``sessions``, each checked for its shape."""
    if not isinstance(annotations, dict):
        raise DataError(f"{source}: expected {{video: {{'anno': array}}}}, got {type(annotations).__name__}")
    out = []
    for s in sessions:
        entry = annotations.get(s)
        if not isinstance(entry, dict) or "anno" not in entry:
            raise DataError(f"{source}: expected an entry {{'anno': ...}} for video {s!r}, found none")
        anno = np.asarray(entry["anno"], dtype=np.float32)
        if anno.ndim != 2 or anno.shape[1] != n_classes:
            raise ShapeError(f"{source}/{s}: expected anno (frames, {n_classes}), got {anno.shape}")
        out.append(anno)
    return out


def load_official(
    features: str | os.PathLike,
    labels: str | os.PathLike,
    data_info: str | os.PathLike,
    *,
    dataset: str = "THUMOS",
    split: str = "test",
    modalities: Sequence[str] = ("rgb", "flow"),
    labels_member: str | None = None,
) -> StreamSet:
    """(a) The OadTR / TRN pickles: features ``{video: {'rgb', 'flow'}}`` (concatenated in that order,
    3072-d for TSN) and labels ``{video: {'anno'}}``; the videos of ``data_info[dataset][split + '_session_set']``.

    ``labels`` may be a zip (``labels_member`` names the pickle inside). Every video is checked before
    the set is built: present in both files, features at least as long as the labels (frames past
    the labels are dropped, as the official windows never reach them).
    """
    if split not in ("train", "test"):
        raise unknown_name("split", split, ("train", "test"))
    info = _data_info(data_info, dataset)
    sessions, class_names = list(info[f"{split}_session_set"]), list(info["class_index"])
    feats = load_numpy_pickle(features)
    annos = labels_from_annotations(load_numpy_pickle(labels, labels_member), sessions, len(class_names), f"{labels}")
    if not isinstance(feats, dict):
        raise DataError(f"{features}: expected {{video: {{'rgb': array, 'flow': array}}}}, got {type(feats).__name__}")
    videos = []
    for s, anno in zip(sessions, annos):
        entry = feats.get(s)
        if not isinstance(entry, dict) or any(m not in entry for m in modalities):
            raise DataError(f"{features}: expected {list(modalities)} features for video {s!r}, found none")
        parts = [np.asarray(entry[m], dtype=np.float32) for m in modalities]
        if any(p.ndim != 2 for p in parts) or len({p.shape[0] for p in parts}) != 1:
            raise ShapeError(
                f"{features}/{s}: expected 2-D {list(modalities)} features of one length, got "
                f"{[p.shape for p in parts]}"
            )
        x = np.concatenate(parts, axis=1)
        if x.shape[0] < anno.shape[0]:
            raise ShapeError(f"{features}/{s}: expected at least {anno.shape[0]} feature frames, got {x.shape[0]}")
        videos.append(Video(s, x[: anno.shape[0]], anno))
    ambiguous = class_names.index("Ambiguous") if "Ambiguous" in class_names else None
    return StreamSet(videos, class_names, ambiguous, name=f"{dataset.lower()}-{split}")


def thumos_annotations(zip_path: str | os.PathLike, split: str = "test") -> dict[str, np.ndarray]:
    """The THUMOS'14 ``anno`` arrays ``{video: (F, 22)}`` of the OadTR ``anno_thumos.zip`` (split val | test)."""
    if split not in ("val", "test"):
        raise unknown_name("THUMOS annotation split", split, ("val", "test"))
    raw = load_numpy_pickle(zip_path, f"thumos_{split}_anno.pickle")
    names = sorted(raw) if isinstance(raw, dict) else []
    return dict(zip(names, labels_from_annotations(raw, names, 22, str(zip_path))))


# ------------------------------------------------------------------------------------ (b) .npy folders


def load_npy_folder(folder: str | os.PathLike) -> StreamSet:
    """(b) ``folder/features/<video>.npy`` ``(F, D)``, ``folder/labels/<video>.npy`` (``(F,)`` class ids or
    ``(F, C)`` one-hot) and ``folder/classes.json`` ``{"class_names": [...], "ambiguous": int | null}``."""
    folder = Path(folder)
    try:
        meta = json.loads((folder / "classes.json").read_text())
        class_names, ambiguous = list(meta["class_names"]), meta.get("ambiguous")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{folder}: expected classes.json with a 'class_names' list ({type(e).__name__}: {e})") from e
    feature_files = sorted((folder / "features").glob("*.npy"))
    if not feature_files:
        raise DataError(f"{folder}: expected features/<video>.npy files, found none")
    c = len(class_names)
    videos = []
    for f in feature_files:
        label_file = folder / "labels" / f.name
        if not label_file.is_file():
            raise DataError(f"{folder}: expected labels/{f.name} for features/{f.name}, found none")
        try:
            x = np.load(f, allow_pickle=False)
            y = np.load(label_file, allow_pickle=False)
        except ValueError as e:
            raise DataError(f"{folder}: {f.name} is not a numeric .npy array ({e})") from e
        if y.ndim == 1:
            if not np.issubdtype(y.dtype, np.integer) or y.min(initial=0) < 0 or y.max(initial=0) >= c:
                raise ShapeError(f"{label_file}: expected class ids in 0..{c - 1}, got {y.min()}..{y.max()}")
            y = np.eye(c, dtype=np.float32)[y]
        if y.ndim != 2 or y.shape[1] != c:
            raise ShapeError(f"{label_file}: expected labels (frames,) or (frames, {c}) for {c} classes, got {y.shape}")
        videos.append(Video(f.stem, np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32)))
    return StreamSet(videos, class_names, ambiguous, name=folder.name)


def save_npy_folder(streams: StreamSet, folder: str | os.PathLike) -> Path:
    """Write ``streams`` in the layout :func:`load_npy_folder` reads."""
    folder = Path(folder)
    (folder / "features").mkdir(parents=True, exist_ok=True)
    (folder / "labels").mkdir(parents=True, exist_ok=True)
    for v in streams.videos:
        np.save(folder / "features" / f"{v.name}.npy", v.features)
        np.save(folder / "labels" / f"{v.name}.npy", v.labels)
    meta = {"class_names": streams.class_names, "ambiguous": streams.ambiguous}
    (folder / "classes.json").write_text(json.dumps(meta) + "\n")
    return folder


# ------------------------------------------------------------------------------ (c) packaged recordings

DIGIT_ACTIONS = (0, 1, 2, 3, 4)  # these digits are the actions; 5..9 are the background
DIGIT_CLASSES = ["background", "zero", "one", "two", "three", "four", "ambiguous"]
DIGITS_TRAIN = 1200  # the first 1200 of scikit-learn's 1797 digits train, the rest test


def digits_streams(split: str = "train", digits_per_video: int = 24, seed: int = 0) -> StreamSet:
    """(c) Streams of real handwriting: scikit-learn's 8x8 digits (UCI, 43 writers) written row by row.

    Each digit is 8 frames, one 8-pixel row each (scaled to [0, 1]); a video is ``digits_per_video``
    digits in a seeded random order. Digits 0-4 are the actions (classes 1-5), 5-9 the background
    (class 0). The first (top) row of an action digit is labelled ambiguous (class 6, last, as in
    THUMOS): an onset that rarely tells which digit is being written, neither trained on nor
    scored. The current row alone rarely tells the digit: the detector must read the rows before
    it, and the first rows of a digit are the hard, early part of an action that anticipation is
    meant to help.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise unknown_name("split", split, ("train", "test"))
    if digits_per_video < 1:
        raise ConfigError(f"digits_per_video: expected >= 1, got {digits_per_video}")
    d = load_digits()
    images, targets = d.images.astype(np.float32) / 16.0, d.target
    idx = np.arange(DIGITS_TRAIN) if split == "train" else np.arange(DIGITS_TRAIN, len(targets))
    idx = np.random.default_rng(seed).permutation(idx)
    n_videos = len(idx) // digits_per_video
    if n_videos == 0:
        raise ConfigError(f"digits_per_video: expected at most {len(idx)} for split {split}, got {digits_per_video}")
    c = len(DIGIT_CLASSES)
    videos = []
    for v in range(n_videos):
        chunk = idx[v * digits_per_video : (v + 1) * digits_per_video]
        rows = images[chunk].reshape(-1, 8)  # (digits * 8, 8)
        cls = np.repeat([DIGIT_ACTIONS.index(t) + 1 if t in DIGIT_ACTIONS else 0 for t in targets[chunk]], 8)
        onset = np.tile(np.arange(8) == 0, len(chunk))
        cls = np.where((cls > 0) & onset, c - 1, cls)
        videos.append(Video(f"digits-{split}-{v:03d}", rows, np.eye(c, dtype=np.float32)[cls]))
    return StreamSet(videos, list(DIGIT_CLASSES), ambiguous=c - 1, name=f"digits-{split}")


def parse_ts(text: str, source: str) -> tuple[np.ndarray, list[str]]:
    """A UEA / sktime ``.ts`` file of equal-length multivariate series -> ``(N, channels, length)``, labels."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    try:
        start = next(i for i, ln in enumerate(lines) if ln.lower() == "@data") + 1
    except StopIteration:
        raise DataError(f"{source}: expected a .ts file with an @data section, found none") from None
    series, labels = [], []
    for ln in lines[start:]:
        *dims, label = ln.split(":")
        try:
            series.append([[float(x) for x in d.split(",")] for d in dims])
        except ValueError as e:
            raise DataError(f"{source}: expected comma-separated numbers in every dimension ({e})") from e
        labels.append(label)
    lengths = {len(d) for s in series for d in s}
    if not series or len(lengths) != 1 or len({len(s) for s in series}) != 1:
        raise DataError(f"{source}: expected equal-length series with equal channels, got lengths {sorted(lengths)}")
    return np.asarray(series, dtype=np.float32), labels


def find_packaged(relative: str, packages: Sequence[str] = ("aeon", "sktime")) -> Path | None:
    """A data file shipped inside an installed package, located without importing the package."""
    for pkg in packages:
        spec = importlib.util.find_spec(pkg)
        for root in (spec.submodule_search_locations or []) if spec else []:
            path = Path(root) / relative
            if path.is_file():
                return path
    return None


BASIC_MOTIONS = ["standing", "walking", "running", "badminton"]  # standing is the background


def basic_motions_streams(
    split: str = "train", recordings_per_video: int = 8, seed: int = 0, path: str | os.PathLike | None = None
) -> StreamSet:
    """(c) The UEA BasicMotions recordings (6-axis accelerometer + gyroscope of a smart watch, 10 s
    at 10 Hz, 4 activities), concatenated in a seeded order into streams; standing is the background.

    Read from ``path`` or from the copy inside an installed aeon / sktime (no import of either).
    """
    if split not in ("train", "test"):
        raise unknown_name("split", split, ("train", "test"))
    rel = f"datasets/data/BasicMotions/BasicMotions_{split.upper()}.ts"
    file = Path(path) if path is not None else find_packaged(rel)
    if file is None or not file.is_file():
        raise DataError(f"BasicMotions: expected {rel} in an installed aeon or sktime (or a path), found none")
    x, labels = parse_ts(file.read_text(), str(file))
    names = [lab.lower() for lab in labels]
    if any(n not in BASIC_MOTIONS for n in names):
        raise DataError(f"{file}: expected the labels {BASIC_MOTIONS}, got {sorted(set(names))}")
    order = np.random.default_rng(seed).permutation(len(names))
    c = len(BASIC_MOTIONS)
    videos = []
    for v in range(len(order) // recordings_per_video):
        chunk = order[v * recordings_per_video : (v + 1) * recordings_per_video]
        feats = np.concatenate([x[i].T for i in chunk])  # (recordings * length, 6)
        cls = np.concatenate([[BASIC_MOTIONS.index(names[i])] * x.shape[2] for i in chunk])
        videos.append(Video(f"basicmotions-{split}-{v:02d}", feats, np.eye(c, dtype=np.float32)[cls]))
    if not videos:
        raise ConfigError(f"recordings_per_video: expected at most {len(order)}, got {recordings_per_video}")
    return StreamSet(videos, list(BASIC_MOTIONS), None, name=f"basicmotions-{split}")


EMBEDDED = ("digits", "basicmotions")


def load_streams(name_or_path: str | os.PathLike, split: str = "train") -> StreamSet:
    """``digits`` / ``basicmotions`` (embedded real recordings), or a folder in the layout of (b)."""
    if str(name_or_path) == "digits":
        return digits_streams(split)
    if str(name_or_path) == "basicmotions":
        return basic_motions_streams(split)
    path = Path(name_or_path)
    if not path.is_dir():
        raise DataError(
            f"--data: expected {' or '.join(EMBEDDED)} or a folder with features/, labels/, classes.json; "
            f"got {name_or_path}"
        )
    return load_npy_folder(path)
