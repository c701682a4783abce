"""Training logs: one JSON object per line in ``out_dir/log.jsonl`` (+ TensorBoard when installed),
and the loss curve as a PNG."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from notelab.core.errors import DataError
from notelab.core.io import atomic_path, atomic_write_text

LOG_FILE = "log.jsonl"
logger = logging.getLogger("notelab.train")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSONL log; a line cut short by a crash (the last one) is skipped."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a JSONL log at {path}, found no such file")
    records = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class RunLogger:
    """Appends records to ``log.jsonl`` and TensorBoard; a no-op when ``out_dir`` is ``None``."""

    def __init__(self, out_dir: str | os.PathLike | None, keep_until: int | None = None) -> None:
        """``keep_until``: on resume, earlier records up to this step are kept (later ones are
        redone by the resumed run); ``None`` starts a fresh log."""
        self.path = Path(out_dir) / LOG_FILE if out_dir is not None else None
        self.history: list[dict[str, Any]] = []
        self.tb = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if keep_until is not None and self.path.is_file():
            self.history = [r for r in read_jsonl(self.path) if r.get("step", math.inf) <= keep_until]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.history))
        self._file = self.path.open("a")
        # TensorBoard is optional; looking for it first avoids a slow failing import of its writer.
        if importlib.util.find_spec("tensorboard") is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(out_dir) / "tensorboard"))  # type: ignore[arg-type]
            except Exception:  # a broken install: the JSONL log is enough
                self.tb = None

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self.path is None:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(f"train/{key}", value, record["step"])

    def close(self) -> None:
        if self.path is not None:
            self._file.close()
        if self.tb is not None:
            self.tb.close()


def plot_history(history: Iterable[dict[str, Any]] | str | os.PathLike, out_png: str | os.PathLike) -> Path:
    """Draw the loss (and learning rate, when logged) against the step into ``out_png``.

    ``history`` is ``FitResult.history`` or the path of a ``log.jsonl``. The loss axis is
    logarithmic when the loss is positive and spans more than a decade.
    """
    # A bare Figure renders with Agg and leaves pyplot's global backend alone.
    from matplotlib.figure import Figure

    records = read_jsonl(history) if isinstance(history, (str, os.PathLike)) else list(history)
    points = [(r["step"], r["loss"]) for r in records if "step" in r and isinstance(r.get("loss"), (int, float))]
    if not points:
        raise DataError("plot_history: expected records with 'step' and 'loss', got none")
    steps, losses = zip(*points)
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(steps, losses, color="tab:blue", label="loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    finite = [v for v in losses if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 10:
        ax.set_yscale("log")
    lrs = [(r["step"], r["lr"]) for r in records if isinstance(r.get("lr"), (int, float))]
    if lrs:
        ax2 = ax.twinx()
        ax2.plot(*zip(*lrs), color="tab:orange", alpha=0.6, label="lr")
        ax2.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.set_title("training loss")
    fig.tight_layout()
    out = Path(out_png)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png")
    return out
