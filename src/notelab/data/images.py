"""Read a folder of images into one ``(N, C, H, W)`` float32 tensor in ``[-1, 1]``.

Two layouts, as torchvision's ``ImageFolder`` and most generative-model repositories use them:

- ``root/<class>/**/*.png|jpg|jpeg``: labels are the indices of the sorted class folder names;
- ``root/*.png|jpg|jpeg``: no labels.

Images are centre-cropped to a square and resized with PIL's bilinear filter, which widens its
support when shrinking (so downsizing is antialiased). A file that PIL cannot decode is skipped
with a warning naming it (one bad file in a scraped folder should not cost the whole run); a
folder with no readable image left is a :class:`~notelab.core.errors.DataError`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from notelab.core.errors import ConfigError, DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F", "P;L")


def _is_image(p: Path) -> bool:
    return p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")


def list_image_files(root: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """The image files under ``root`` with their labels and class names (``None`` for a flat folder)."""
    if not root.is_dir():
        raise DataError(f"{root}: no such folder; expected an image folder root/<class>/*.png or root/*.png")
    loose = sorted(p for p in root.iterdir() if _is_image(p))
    class_dirs = sorted(d for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    per_class = {d.name: sorted(p for p in d.rglob("*") if _is_image(p)) for d in class_dirs}
    per_class = {k: v for k, v in per_class.items() if v}
    if per_class and loose:
        raise DataError(
            f"{root}: mixes images in the root ({loose[0].name}, ...) with class folders ({', '.join(per_class)}); "
            "expected one layout, root/<class>/*.png or root/*.png"
        )
    if per_class:
        classes = sorted(per_class)
        files = [p for c in classes for p in per_class[c]]
        labels = [i for i, c in enumerate(classes) for _ in per_class[c]]
        return files, labels, classes
    if not loose:
        raise DataError(
            f"{root}: no images found; expected .png/.jpg/.jpeg files in root/<class>/ folders or in the root"
        )
    return loose, None, None


def _open(path: Path) -> Image.Image | None:
    try:
        img = Image.open(path)
        img.load()  # decode now, so a truncated file fails here rather than later
        return img
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        warnings.warn(f"{path}: skipped, not a readable image ({e})", stacklevel=3)
        return None


def _centre_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def load_image_folder(
    root: str | Path,
    image_size: int | None = None,
    channels: int | None = None,
    max_images: int | None = None,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None, list[str] | None]:
    """Read ``root`` into ``(x, y, classes)``: ``x`` (N, C, H, W) in [-1, 1], ``y`` (N,) int64 or ``None``.

    ``image_size=None`` keeps the images' own size (all must then agree); ``channels=None`` picks
    3 when any image has colour, else 1. ``max_images`` keeps a seeded random subset (in file
    order), reading only as many files as it needs.
    """
    root = Path(root)
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ConfigError(f"image_size: expected a positive int, got {image_size!r}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels: expected 1 (grayscale) or 3 (RGB), got {channels!r}")
    if max_images is not None and (not isinstance(max_images, int) or max_images < 1):
        raise ConfigError(f"max_images: expected a positive int, got {max_images!r}")
    files, labels, classes = list_image_files(root)
    order = list(range(len(files)))
    if max_images is not None and max_images < len(files):
        order = list(np.random.default_rng(seed).permutation(len(files)))
    images: list[Image.Image] = []
    kept: list[int] = []
    for i in order:
        img = _open(files[i])
        if img is None:
            continue
        images.append(img)
        kept.append(i)
        if max_images is not None and len(images) == max_images:
            break
    if not images:
        raise DataError(f"{root}: none of the {len(files)} image file(s) could be read; expected PNG or JPEG images")
    by_file = sorted(range(len(kept)), key=lambda j: kept[j])
    images, kept = [images[j] for j in by_file], [kept[j] for j in by_file]

    if channels is None:
        channels = 1 if all(img.mode in _GRAY_MODES for img in images) else 3
    mode = "L" if channels == 1 else "RGB"
    if image_size is None:
        sizes = {img.size for img in images}
        if len(sizes) > 1:
            raise DataError(f"{root}: images have different sizes {sorted(sizes)[:3]}...; pass image_size to resize")
    arrays = []
    for img in images:
        img = img.convert(mode)
        if image_size is not None:
            img = _centre_square(img).resize((image_size, image_size), Image.Resampling.BILINEAR)
        a = np.asarray(img, dtype=np.uint8)
        arrays.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
    x = torch.from_numpy(np.stack(arrays)).float() / 127.5 - 1.0
    y = torch.tensor([labels[i] for i in kept], dtype=torch.long) if labels is not None else None
    return x, y, classes
