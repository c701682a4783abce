"""PNG helpers: image grids and 2-D scatters."""

import numpy as np
import pytest
import torch
from PIL import Image

from notelab.core.errors import ShapeError
from notelab.eval import image_grid, line_png, save_image_grid, scatter_png


def test_image_grid_layout_and_values():
    x = torch.stack([torch.full((1, 2, 2), -1.0), torch.full((1, 2, 2), 1.0), torch.zeros(1, 2, 2)])
    grid = image_grid(x, nrow=2, padding=1)
    assert grid.shape == (1 + 2 * 3, 1 + 2 * 3) and grid.dtype == np.uint8
    assert (grid[1:3, 1:3] == 0).all() and (grid[1:3, 4:6] == 255).all() and (grid[4:6, 1:3] == 128).all()
    assert image_grid(torch.zeros(4, 3, 5, 5)).shape == (1 + 2 * 6, 1 + 2 * 6, 3)


def test_save_image_grid_upscales_small_images(tmp_path):
    path = save_image_grid(torch.rand(10, 1, 8, 8) * 2 - 1, tmp_path / "out" / "grid.png")
    img = Image.open(path)
    # 10 images -> 4 per row, 3 rows; 8 px tiles upscaled x4 to 32 px, 1 px padding.
    assert img.size == (1 + 4 * 33, 1 + 3 * 33) and img.mode == "L"
    assert not list((tmp_path / "out").glob(".*tmp"))
    with pytest.raises(ShapeError, match=r"\(N, C, H, W\)"):
        save_image_grid(torch.zeros(3, 8, 8), tmp_path / "bad.png")


def test_scatter_and_line_png(tmp_path):
    p = scatter_png(torch.randn(200, 2), tmp_path / "s.png", title="samples", reference=torch.randn(100, 2))
    assert Image.open(p).size == (400, 400)
    q = line_png({"ddim": ([10, 20, 50], [9.0, 6.0, 5.0]), "ddpm": ([1000], [4.0])}, tmp_path / "l.png", logx=True)
    assert Image.open(q).format == "PNG"
    with pytest.raises(ShapeError, match=r"\(N, 2\)"):
        scatter_png(torch.randn(5, 3), tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
