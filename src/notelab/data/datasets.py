"""One loader for every data set notelab trains on: ``load_dataset(name_or_path, ...) -> ArrayDataset``.

Known names: the toy 2-D densities of :mod:`notelab.data.toy` and ``digits`` (scikit-learn's 8x8
handwritten digits, 1797 images). Anything else is read as a path: an image folder (see
:mod:`notelab.data.images`), a ``.npy`` file or a ``.npz`` archive. Everything is held in memory
as one float32 tensor; images are ``(N, C, H, W)`` scaled to ``[-1, 1]``, points ``(N, D)``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from notelab.core.errors import ConfigError, DataError, ShapeError, unknown_name
from notelab.data.images import load_image_folder
from notelab.data.toy import TOY_DENSITIES, ToyDensity, toy_density

KINDS = ("points", "images")
SPLITS = ("all", "train", "test")
# The fixed split behind ``split="train" | "test"``: a seeded 80/20 permutation, the same in every run.
SPLIT_SEED = 0
TEST_FRACTION = 0.2


class ArrayDataset(Dataset):
    """An in-memory data set: ``x`` (N, ...) float32, optional labels ``y`` (N,) int64.

    ``ds[i]`` is ``x[i]``, or ``(x[i], y[i])`` when built with ``with_labels=True``. ``kind`` is
    ``"points"`` for ``(N, D)`` data and ``"images"`` for ``(N, C, H, W)``; ``density`` is the
    generating :class:`~notelab.data.toy.ToyDensity` for toy data, else ``None``.
    """

    def __init__(
        self,
        x: torch.Tensor | np.ndarray,
        y: torch.Tensor | np.ndarray | None = None,
        *,
        name: str = "array",
        kind: str | None = None,
        classes: Sequence[str] | None = None,
        density: ToyDensity | None = None,
        with_labels: bool = False,
    ) -> None:
        x = torch.as_tensor(x)
        if not x.is_floating_point():
            raise ShapeError(f"{name}: expected floating-point data, got dtype {x.dtype}")
        x = x.float().contiguous()
        if kind is None:
            kind = {2: "points", 4: "images"}.get(x.ndim)
            if kind is None:
                raise ShapeError(f"{name}: expected points (N, D) or images (N, C, H, W), got shape {tuple(x.shape)}")
        if kind not in KINDS:
            raise unknown_name("data kind", kind, KINDS)
        if (kind == "points" and x.ndim != 2) or (kind == "images" and x.ndim != 4):
            raise ShapeError(f"{name}: kind {kind!r} expects {2 if kind == 'points' else 4} dims, got {tuple(x.shape)}")
        if y is not None:
            y = torch.as_tensor(y)
            if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
                raise ShapeError(f"{name}: expected integer labels, got dtype {y.dtype}")
            y = y.long()
            if y.shape != (x.shape[0],):
                raise ShapeError(f"{name}: expected labels of shape ({x.shape[0]},), got {tuple(y.shape)}")
        if with_labels and y is None:
            raise DataError(f"{name}: with_labels=True asked for, but this data set has no labels")
        self.x = x
        self.y = y
        self.name = name
        self.kind = kind
        self.classes = list(classes) if classes is not None else None
        self.density = density
        self.with_labels = with_labels

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one example, e.g. ``(2,)`` or ``(1, 8, 8)``."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return self.x.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if self.with_labels:
            return self.x[i], self.y[i]  # type: ignore[index]
        return self.x[i]

    def __repr__(self) -> str:
        return f"ArrayDataset(name={self.name!r}, kind={self.kind!r}, n={len(self)}, sample_shape={self.sample_shape})"

    def subset(self, index: torch.Tensor | np.ndarray | Sequence[int], name: str | None = None) -> ArrayDataset:
        """The examples at ``index`` as a new data set with the same metadata."""
        index = torch.as_tensor(index, dtype=torch.long)
        return ArrayDataset(
            self.x[index],
            None if self.y is None else self.y[index],
            name=name or self.name,
            kind=self.kind,
            classes=self.classes,
            density=self.density,
            with_labels=self.with_labels,
        )

    def split(self, test_fraction: float = TEST_FRACTION, seed: int = SPLIT_SEED) -> tuple[ArrayDataset, ArrayDataset]:
        """A deterministic ``(train, test)`` split: a seeded permutation, ``round(N * test_fraction)`` to test.

        NumPy's PCG64 makes the permutation the same on every platform and run for a given seed.
        """
        if not 0 < test_fraction < 1:
            raise ConfigError(f"split: expected 0 < test_fraction < 1, got {test_fraction}")
        n_test = int(round(len(self) * test_fraction))
        if n_test == 0 or n_test == len(self):
            raise DataError(f"{self.name}: {len(self)} examples cannot be split with test_fraction={test_fraction}")
        perm = np.random.default_rng(seed).permutation(len(self))
        test, train = np.sort(perm[:n_test]), np.sort(perm[n_test:])
        return self.subset(train, f"{self.name}[train]"), self.subset(test, f"{self.name}[test]")


@lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are counts 0..16 (4x4 blocks of a 32x32 bitmap); map them to [-1, 1].
    x = (bunch.images.astype(np.float32) / 16.0) * 2.0 - 1.0
    return x[:, None], bunch.target.astype(np.int64)


def _load_digits(image_size: int | None) -> ArrayDataset:
    x, y = _digits_arrays()
    xt = torch.from_numpy(x.copy())
    if image_size is not None and image_size != 8:
        xt = F.interpolate(xt, size=(image_size, image_size), mode="bilinear", antialias=True, align_corners=False)
        xt = xt.clamp(-1, 1)
    return ArrayDataset(xt, torch.from_numpy(y.copy()), name="digits", classes=[str(i) for i in range(10)])


def _images_from_array(x: np.ndarray) -> np.ndarray:
    """Bring a 3-D or 4-D array to (N, C, H, W) float32 in [-1, 1] (uint8 is rescaled, floats kept)."""
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
        x = np.moveaxis(x, -1, 1)  # channels-last (N, H, W, C), as PIL and most image dumps write it
    if x.dtype == np.uint8:
        return x.astype(np.float32) / 127.5 - 1.0
    return x.astype(np.float32)


def _load_array_file(path: Path, key: str | None, label_key: str | None) -> ArrayDataset:
    with open(path, "rb") as f:
        magic = f.read(6)
    # Check the magic first: np.load takes anything else for a pickle and would blame pickling.
    if magic != b"\x93NUMPY" and not magic.startswith(b"PK"):
        raise DataError(f"{path}: not a readable .npy/.npz file (no NumPy or zip header)")
    try:
        loaded = np.load(path, allow_pickle=False)
    except ValueError as e:
        if "pickle" in str(e):
            raise DataError(f"{path}: holds Python objects (needs pickle, which notelab never loads)") from e
        raise DataError(f"{path}: not a readable .npy/.npz file ({e})") from e
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: not a readable .npy/.npz file ({e})") from e
    labels = None
    if isinstance(loaded, np.lib.npyio.NpzFile):
        with loaded:
            keys = list(loaded.keys())
            if key is None:
                candidates = [k for k in keys if k != label_key]
                if len(candidates) != 1:
                    raise DataError(f"{path}: holds arrays {keys}; pass key= to choose the data array")
                key = candidates[0]
            for k in (key, label_key):
                if k is not None and k not in keys:
                    raise DataError(f"{path}: no array {k!r}; arrays: {keys}")
            try:
                x = loaded[key]
                labels = loaded[label_key] if label_key is not None else None
            except ValueError as e:
                raise DataError(f"{path}: array holds Python objects (needs pickle, never loaded) ({e})") from e
    else:
        if label_key is not None:
            raise ConfigError(f"{path}: label_key applies to .npz archives only; a .npy file holds one array")
        x = loaded
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{path}: expected a numeric array, got dtype {x.dtype}")
    if x.ndim == 2:
        data = x.astype(np.float32)
    elif x.ndim in (3, 4):
        data = _images_from_array(x)
    else:
        raise DataError(f"{path}: expected points (N, D) or images (N, [C,] H, W), got shape {x.shape}")
    if len(data) == 0:
        raise DataError(f"{path}: expected at least one example, got an empty array of shape {x.shape}")
    if not np.isfinite(data).all():
        raise DataError(f"{path}: expected finite values, found NaN or Inf")
    return ArrayDataset(torch.from_numpy(data), None if labels is None else torch.from_numpy(labels), name=path.name)


def dataset_names() -> list[str]:
    """The built-in data set names (a path to an image folder, ``.npy`` or ``.npz`` is accepted too)."""
    return sorted(["digits", *TOY_DENSITIES])


def load_dataset(
    name: str | os.PathLike,
    *,
    n: int = 8192,
    seed: int = 0,
    split: str = "all",
    image_size: int | None = None,
    channels: int | None = None,
    max_images: int | None = None,
    key: str | None = None,
    label_key: str | None = None,
    with_labels: bool = False,
) -> ArrayDataset:
    """Load a built-in data set by name, or a folder / ``.npy`` / ``.npz`` by path.

    Args:
        name: ``digits``, a toy density (``8gaussians``, ``checkerboard``, ``moons``, ``rings``,
            ``swissroll``), an image folder (``root/<class>/*.png|jpg|jpeg`` or flat ``root/*.png``),
            or a ``.npy`` / ``.npz`` file (2-D arrays are points, 3-D/4-D arrays images; uint8 images
            are mapped from [0, 255] to [-1, 1], float arrays are taken as they are).
        n: number of points drawn from a toy density (ignored otherwise).
        seed: seeds the toy sampler and the choice of ``max_images`` images from a folder.
        split: ``all``, or ``train`` / ``test`` of a fixed seeded 80/20 split (the same in every run).
        image_size: resize images to ``image_size x image_size`` (folders and digits; default: keep).
        channels: 1 (grayscale) or 3 (RGB) for image folders (default: 3 if any image has colour).
        max_images: read at most this many images from a folder (a seeded random subset).
        key: the data array of a ``.npz`` archive holding several arrays.
        label_key: an integer label array of a ``.npz`` archive.
        with_labels: make ``ds[i]`` return ``(x, y)``.
    """
    if split not in SPLITS:
        raise unknown_name("split", split, SPLITS)
    name_str = os.fspath(name)
    if name_str in TOY_DENSITIES:
        if not isinstance(n, int) or n < 2:
            raise ConfigError(f"{name_str}: expected a number of points n >= 2, got {n!r}")
        density = toy_density(name_str)
        x = density.sample(n, torch.Generator().manual_seed(seed))
        ds = ArrayDataset(x, name=name_str, density=density)
    elif name_str == "digits":
        ds = _load_digits(image_size)
    else:
        path = Path(name_str)
        if path.is_dir():
            x, y, classes = load_image_folder(
                path, image_size=image_size, channels=channels, max_images=max_images, seed=seed
            )
            ds = ArrayDataset(x, y, name=path.name, kind="images", classes=classes)
        elif path.suffix.lower() in (".npy", ".npz"):
            if not path.is_file():
                raise DataError(f"{path}: no such file; expected a .npy or .npz array file")
            ds = _load_array_file(path, key, label_key)
        elif path.exists():
            raise DataError(f"{path}: expected an image folder, a .npy or a .npz file, got another kind of file")
        elif os.sep in name_str or "/" in name_str or path.suffix:
            raise DataError(f"{path}: no such file or folder; expected an image folder, a .npy or a .npz file")
        else:
            err = unknown_name("dataset", name_str, dataset_names())
            raise ConfigError(f"{err} (or a path to an image folder, a .npy or a .npz file)")
    if with_labels:
        if ds.y is None:
            raise DataError(f"{name_str}: with_labels=True asked for, but this data set has no labels")
        ds.with_labels = True
    if split != "all":
        train, test = ds.split(TEST_FRACTION, SPLIT_SEED)
        ds = train if split == "train" else test
    return ds
