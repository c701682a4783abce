"""Read a folder of images into one ``(N, C, H, W)`` float32 tensor in ``[-1, 1]``.

Two layouts, as torchvision's ``ImageFolder`` and most generative-model repositories use them:

- ``root/<class>/**/*.png|jpg|jpeg``: labels are the indices of the sorted class folder names;
- ``root/*.png|jpg|jpeg``: no labels.

Images are centre-cropped to a square and resized with PIL's bilinear filter, which widens its
support when shrinking (so downsizing is antialiased). They are read one at a time and only the
resized array is kept (a JPEG is decoded at the smallest DCT scale that still covers the size,
PIL's ``draft``), so a folder of large photos costs one full-size image, not all of them.

Pixel values are scaled by their mode's full range to [-1, 1]: 8-bit modes by 255, 16-bit
grayscale PNGs (PIL modes ``I;16*``, or ``I`` in older Pillow) by 65535, ``F`` by 255 (PIL's
convention for float images); alpha is dropped, palettes and CMYK become RGB. A file that PIL cannot decode is skipped
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
_GRAY_MODES = ("1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F", "P;L")
# Gray modes with more than 8 bits, read as float and divided by their full scale (PIL's
# convert("L") would clip them at 255, turning a 16-bit image white).
_WIDE_GRAY_SCALE = {"I": 65535.0, "I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "F": 255.0}


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


def _open(path: Path, image_size: int | None) -> Image.Image | None:
    try:
        img = Image.open(path)
        if image_size is not None and img.format == "JPEG":
            # decode at 1/2, 1/4 or 1/8 scale when that still covers image_size x image_size
            img.draft(img.mode, (image_size, image_size))
        img.load()  # decode now, so a truncated file fails here rather than later
        return img
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as e:
        warnings.warn(f"{path}: skipped, not a readable image ({e})", stacklevel=4)  # the caller of load_image_folder
        return None


def _centre_square(img: Image.Image) -> Image.Image:
    w, h = img.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return img.crop((left, top, left + s, top + s))


def to_unit_range(img: Image.Image, channels: int, image_size: int | None = None) -> np.ndarray:
    """``img`` as a ``(channels, H, W)`` float32 array in [-1, 1], centre-cropped and resized to
    ``image_size`` when given: x = 2 v / v_max - 1 with v_max the full scale of its mode."""
    scale = _WIDE_GRAY_SCALE.get(img.mode)
    if scale is not None:
        img = img.convert("F")  # resized in float: no clipping, no rounding to 8 bits
    else:
        scale = 255.0
        img = img.convert("L" if channels == 1 else "RGB")
    if image_size is not None:
        img = _centre_square(img).resize((image_size, image_size), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.float32)
    a = a[None] if a.ndim == 2 else a.transpose(2, 0, 1)
    if a.shape[0] != channels:
        a = np.repeat(a, channels, axis=0)  # gray shown as RGB, as PIL's convert("RGB") does
    return np.clip(a * np.float32(2.0 / scale) - np.float32(1.0), -1.0, 1.0)


def _read_array(path: Path, image_size: int | None, channels: int | None) -> tuple[np.ndarray, tuple[int, int]] | None:
    """(the image as ``to_unit_range`` gives it, its size as read), or None when it is unreadable;
    a gray image stays one channel when ``channels`` is None. The decoded image is freed on return."""
    img = _open(path, image_size)
    if img is None:
        return None
    with img:
        gray = img.mode in _GRAY_MODES
        return to_unit_range(img, 1 if (channels == 1 or (channels is None and gray)) else 3, image_size), img.size


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
    order), reading only as many files as it needs. One image is decoded at a time and only its
    resized array is kept.
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
    arrays: dict[int, np.ndarray] = {}  # file index -> (C, H, W); gray images as C = 1 until the end
    first_size: tuple[Path, tuple[int, int]] | None = None
    for i in order:
        read = _read_array(files[i], image_size, channels)
        if read is None:
            continue
        arrays[i], size = read
        if image_size is None:
            if first_size is None:
                first_size = (files[i], size)
            elif size != first_size[1]:
                raise DataError(
                    f"{root}: images have different sizes ({first_size[0].name} {first_size[1]}, "
                    f"{files[i].name} {size}); pass image_size to resize"
                )
        if max_images is not None and len(arrays) == max_images:
            break
    if not arrays:
        raise DataError(f"{root}: none of the {len(files)} image file(s) could be read; expected PNG or JPEG images")
    kept = sorted(arrays)
    if channels is None:
        channels = max(a.shape[0] for a in arrays.values())
    x = torch.from_numpy(np.stack([np.repeat(arrays[i], channels // arrays[i].shape[0], axis=0) for i in kept]))
    y = torch.tensor([labels[i] for i in kept], dtype=torch.long) if labels is not None else None
    return x, y, classes
