"""Image folders: both layouts, resizing, channels, max_images, corrupt files and empty folders."""

import numpy as np
import pytest
import torch
from PIL import Image

from notelab.core.errors import ConfigError, DataError
from notelab.data import load_dataset, load_image_folder


def write(path, size=(10, 10), colour=(255, 0, 0), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour if mode == "RGB" else colour[0]).save(path)


@pytest.fixture
def class_folder(tmp_path):
    root = tmp_path / "shapes"
    for i in range(3):
        write(root / "cat" / f"{i}.png", colour=(255, 255, 255))
    for i in range(2):
        write(root / "ant" / f"{i}.jpg", colour=(0, 0, 0))
    write(root / "ant" / "nested" / "deep.PNG", colour=(0, 0, 0))
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def test_class_layout_labels_from_sorted_folder_names(class_folder):
    ds = load_dataset(class_folder, image_size=8, channels=1)
    assert (len(ds), ds.sample_shape, ds.kind, ds.name) == (6, (1, 8, 8), "images", "shapes")
    assert ds.classes == ["ant", "cat"]
    assert ds.y.tolist() == [0, 0, 0, 1, 1, 1]
    # ant images are black, cat images white; JPEG may wobble a little.
    assert ds.x[ds.y == 0].max().item() < -0.9 and ds.x[ds.y == 1].min().item() > 0.9


def test_flat_layout_rgb_resize_and_centre_crop(tmp_path):
    root = tmp_path / "flat"
    img = np.zeros((20, 40, 3), dtype=np.uint8)
    img[:, :10] = 255  # a white band on the left that the centre crop (columns 10..30) removes
    img[:, 10:30, 1] = 255
    root.mkdir()
    Image.fromarray(img).save(root / "a.png")
    write(root / "b.png", size=(20, 40), colour=(0, 0, 255))
    x, y, classes = load_image_folder(root, image_size=4)
    assert x.shape == (2, 3, 4, 4) and y is None and classes is None
    assert torch.allclose(x[0, 1], torch.ones(4, 4)) and torch.allclose(x[0, 0], -torch.ones(4, 4))
    assert torch.allclose(x[1, 2], torch.ones(4, 4))


def test_resize_antialiases_when_shrinking(tmp_path):
    root = tmp_path / "stripes"
    root.mkdir()
    stripes = np.zeros((32, 32), dtype=np.uint8)
    stripes[:, ::2] = 255  # 1-pixel stripes: naive subsampling would give all-white or all-black
    Image.fromarray(stripes).save(root / "s.png")
    x = load_dataset(root, image_size=8).x
    assert x.shape == (1, 1, 8, 8)
    assert x.mean().item() == pytest.approx(0.0, abs=0.05) and x.std().item() < 0.1


def test_channels_inferred_and_sizes_must_agree_without_image_size(tmp_path):
    root = tmp_path / "gray"
    write(root / "a.png", mode="L")
    write(root / "b.png", mode="L")
    assert load_dataset(root).sample_shape == (1, 10, 10)
    assert load_dataset(root, channels=3).sample_shape == (3, 10, 10)
    write(root / "c.png", size=(12, 12), mode="L")
    with pytest.raises(DataError, match="pass image_size"):
        load_dataset(root)
    assert load_dataset(root, image_size=6).sample_shape == (1, 6, 6)


def test_max_images_is_a_seeded_subset(class_folder):
    a = load_dataset(class_folder, image_size=4, max_images=3, seed=0)
    b = load_dataset(class_folder, image_size=4, max_images=3, seed=0)
    assert len(a) == 3 and torch.equal(a.y, b.y)
    assert a.y.tolist() == sorted(a.y.tolist())  # kept in file order


def test_corrupt_file_is_skipped_with_a_warning(class_folder):
    (class_folder / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.warns(UserWarning, match="broken.png: skipped"):
        ds = load_dataset(class_folder, image_size=4)
    assert len(ds) == 6


def test_empty_missing_and_unreadable_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="empty: no images found; expected .png/.jpg/.jpeg"):
        load_dataset(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.png").write_bytes(b"nope")
    with pytest.warns(UserWarning), pytest.raises(DataError, match="none of the 1 image file"):
        load_dataset(bad)
    with pytest.raises(DataError, match="no such folder"):
        load_image_folder(tmp_path / "missing")
    mixed = tmp_path / "mixed"
    write(mixed / "loose.png")
    write(mixed / "cls" / "a.png")
    with pytest.raises(DataError, match="expected one layout"):
        load_dataset(mixed)
    with pytest.raises(ConfigError, match="channels: expected 1"):
        load_image_folder(mixed / "cls", channels=2)


def test_16_bit_grayscale_png_is_scaled_not_clipped(tmp_path):
    root = tmp_path / "deep"
    root.mkdir()
    ramp = np.linspace(0, 65535, 16 * 16).round().astype(np.uint16).reshape(16, 16)
    Image.fromarray(ramp).save(root / "ramp.png")
    assert Image.open(root / "ramp.png").mode.startswith("I")  # a real 16-bit PNG
    x = load_dataset(root).x
    assert x.shape == (1, 1, 16, 16)
    torch.testing.assert_close(x[0, 0], torch.from_numpy(ramp / 65535.0 * 2 - 1).float(), rtol=0, atol=1e-6)
    assert (x > 0.99).float().mean().item() < 0.01  # was: everything above 255/65535 clipped to +1
    # resized in float, then shown as RGB beside a colour image
    write(root / "red.png", size=(16, 16))
    x = load_dataset(root, image_size=4).x
    assert x.shape == (2, 3, 4, 4) and torch.equal(x[0, 0], x[0, 2])  # file order: ramp, red
    assert -0.95 < x[0].min().item() < -0.5 and 0.5 < x[0].max().item() < 0.95  # bilinear means of the ramp


@pytest.mark.parametrize(
    ("mode", "value", "expected"),
    [
        ("1", 1, 1.0),
        ("L", 51, 51 / 127.5 - 1),
        ("LA", (51, 0), 51 / 127.5 - 1),  # alpha dropped
        ("I", 65535, 1.0),  # 16-bit PNGs in older Pillow
        ("I", 16384, 16384 / 32767.5 - 1),
        ("I;16", 32768, 32768 / 32767.5 - 1),
        ("F", 51.0, 51 / 127.5 - 1),  # PIL's float scale is that of L
    ],
)
def test_gray_modes_scale_by_their_full_range(mode, value, expected):
    from notelab.data.images import to_unit_range

    img = Image.new(mode, (6, 4), value)
    for channels in (1, 3):
        a = to_unit_range(img, channels)
        assert a.shape == (channels, 4, 6) and a.dtype == np.float32
        np.testing.assert_allclose(a, expected, rtol=0, atol=1e-6)
    np.testing.assert_allclose(to_unit_range(img, 1, image_size=2), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("mode", "value"),
    [("RGBA", (255, 0, 51, 0)), ("P", 0), ("CMYK", (0, 255, 204, 0)), ("RGB", (255, 0, 51))],
)
def test_colour_modes_scale_to_rgb(tmp_path, mode, value):
    img = Image.new(mode, (8, 8), value)
    if mode == "P":
        img.putpalette([255, 0, 51] + [0] * 765)
    root = tmp_path / mode
    root.mkdir()
    img.save(root / ("a.jpg" if mode == "CMYK" else "a.png"), **({"quality": 100} if mode == "CMYK" else {}))
    x = load_dataset(root).x
    assert x.shape == (1, 3, 8, 8)
    tol = 0.05 if mode == "CMYK" else 1e-6  # JPEG
    np.testing.assert_allclose(x[0].mean((1, 2)).numpy(), [1.0, -1.0, 51 / 127.5 - 1], atol=tol)


def test_large_images_are_resized_one_at_a_time(tmp_path, monkeypatch):
    """Only the resized arrays are kept: no opened full-size image outlives its turn."""
    import gc
    import weakref

    import notelab.data.images as images

    root = tmp_path / "big"
    root.mkdir()
    grad = np.add.outer(np.arange(1024), np.arange(1024)).astype(np.uint8)
    for i in range(4):
        Image.fromarray(np.stack([grad, grad.T, grad // 2], -1)).save(root / f"{i}.png", compress_level=1)
        Image.fromarray(np.stack([grad, grad.T, grad // 2], -1)).save(root / f"{i}.jpg", quality=90)
    opened, alive_at_open = [], []
    real_open = Image.open

    def tracking_open(*args, **kw):
        gc.collect()
        alive_at_open.append(sum(r() is not None for r in opened))
        img = real_open(*args, **kw)
        opened.append(weakref.ref(img))
        return img

    monkeypatch.setattr(images.Image, "open", tracking_open)
    x, _, _ = load_image_folder(root, image_size=16)
    assert x.shape == (8, 3, 16, 16) and len(alive_at_open) == 8
    assert max(alive_at_open) == 0, alive_at_open  # the old loader held every full-size image
    jpeg_sizes = []
    monkeypatch.setattr(
        images, "to_unit_range", lambda img, c, s=None: jpeg_sizes.append(img.size) or np.zeros((c, s, s))
    )
    load_image_folder(root, image_size=16, channels=3)
    assert (128, 128) in jpeg_sizes  # JPEGs decoded at 1/8 scale (draft), PNGs at full size
