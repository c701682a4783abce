"""PNG figures every family needs: a grid of image samples and a scatter of 2-D samples.

Images go through PIL (no torchvision); scatters through matplotlib's object API with the Agg
canvas, so no global pyplot state or display is touched. Files are written atomically.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from notelab.core.errors import ConfigError, ShapeError
from notelab.core.io import atomic_write_bytes


def image_grid(x: torch.Tensor | np.ndarray, nrow: int | None = None, padding: int = 1, scale: int = 1) -> np.ndarray:
    """Tile images ``x`` (N, C, H, W) in [-1, 1] into one uint8 array (rows, cols[, 3]).

    ``nrow`` images per row (default ``ceil(sqrt(N))``); each image is upscaled ``scale`` times with
    nearest-neighbour so that 8x8 digits stay sharp; ``padding`` pixels of grey between tiles.
    """
    x = torch.as_tensor(x).detach().cpu().float()
    if x.ndim != 4 or x.shape[1] not in (1, 3) or len(x) == 0:
        raise ShapeError(f"image grid: expected images (N, C, H, W) with N >= 1 and C in (1, 3), got {tuple(x.shape)}")
    if nrow is not None and nrow < 1:
        raise ConfigError(f"image grid: expected nrow >= 1, got {nrow}")
    n, c, h, w = x.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    ncol_rows = math.ceil(n / nrow)
    img = ((x.nan_to_num(0.0).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = img.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    h, w = h * scale, w * scale
    grid = torch.full((c, ncol_rows * (h + padding) + padding, nrow * (w + padding) + padding), 128, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        top, left = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, top : top + h, left : left + w] = img[i]
    arr = grid.numpy()
    return arr[0] if c == 1 else arr.transpose(1, 2, 0)


def save_image_grid(
    x: torch.Tensor | np.ndarray, path: str | os.PathLike, nrow: int | None = None, scale: int | None = None
) -> Path:
    """Write images ``x`` (N, C, H, W) in [-1, 1] as one PNG grid; small images are upscaled to >= 32 px."""
    x = torch.as_tensor(x)
    if scale is None:
        scale = max(1, math.ceil(32 / max(int(x.shape[-1]), 1))) if x.ndim == 4 else 1
    arr = image_grid(x, nrow=nrow, scale=scale)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def scatter_png(
    points: torch.Tensor | np.ndarray,
    path: str | os.PathLike,
    title: str | None = None,
    lim: float | Sequence[float] | None = 4.5,
    size: float = 1.0,
    reference: torch.Tensor | np.ndarray | None = None,
) -> Path:
    """Scatter 2-D samples ``points`` (N, 2) to a PNG; ``reference`` (e.g. the data) is drawn faintly behind.

    ``lim`` is a half-width (square axes ``[-lim, lim]^2``), ``(xmin, xmax, ymin, ymax)``, or ``None`` (autoscale).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    p = _points(points, "points")
    fig = Figure(figsize=(4, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if reference is not None:
        r = _points(reference, "reference")
        ax.scatter(r[:, 0], r[:, 1], s=size, c="0.8", linewidths=0, rasterized=True)
    ax.scatter(p[:, 0], p[:, 1], s=size, c="C0", alpha=0.6, linewidths=0, rasterized=True)
    if lim is not None:
        box = (-lim, lim, -lim, lim) if isinstance(lim, (int, float)) else tuple(lim)
        if len(box) != 4:
            raise ConfigError(f"scatter_png: expected lim as a number or (xmin, xmax, ymin, ymax), got {lim!r}")
        ax.set_xlim(box[0], box[1])
        ax.set_ylim(box[2], box[3])
    ax.set_aspect("equal")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def _points(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    a = torch.as_tensor(x).detach().cpu().double().numpy()
    if a.ndim != 2 or a.shape[1] != 2:
        raise ShapeError(f"scatter_png: expected {name} of shape (N, 2), got {a.shape}")
    return a


def line_png(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    xlabel: str = "",
    ylabel: str = "",
    title: str | None = None,
    logx: bool = False,
    logy: bool = False,
    marker: str | None = None,
) -> Path:
    """Line plot of named ``(xs, ys)`` series to a PNG (loss curves, quality against time or steps)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not series:
        raise ConfigError("line_png: expected at least one series, got none")
    fig = Figure(figsize=(5, 3.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        if len(xs) != len(ys):
            raise ShapeError(f"line_png: series {label!r} has {len(xs)} x values but {len(ys)} y values")
        ax.plot(list(xs), list(ys), label=label, marker=marker)
    ax.set_xscale("log" if logx else "linear")
    ax.set_yscale("log" if logy else "linear")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)
