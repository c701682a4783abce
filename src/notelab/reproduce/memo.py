"""Finished pieces of a claim's run, kept so that a run that was stopped picks up where it stopped.

A full claim can take longer than one sitting allows (a GPU lease of ten minutes, a laptop closed). A
:class:`Memo` keeps each finished piece (a throughput measurement, one of many trainings) under
``OUT/NAME/.memo/<fingerprint>/``; the same command run again reuses every piece whose fingerprint matches
(claim, settings, seed, device: anything that would change the piece) and computes only the rest. The
claim's ``result.json`` written, ``notelab.reproduce`` removes the memo.

A piece is a JSON value (never pickled), written last and atomically, so a piece whose file exists is
complete; what it refers to (a model a later part needs, saved by the caller inside :meth:`Memo.value`'s
function, under :meth:`Memo.folder`) is durable before it. A file that does not read back (truncated,
edited, foreign) is computed again.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from notelab.core.io import atomic_write_text

MEMO_DIR = ".memo"
MAX_PIECE_BYTES = 16 * 2**20  # a piece is a few numbers per model and length, never megabytes
_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class Memo:
    """``value(key, fn)``: ``fn()``'s JSON value, from an earlier run with this fingerprint when it left one.

    ``folder`` None keeps nothing (every ``value`` calls its function). ``source``: the claim's module file,
    whose bytes join the fingerprint (a changed recipe never reuses the old one's pieces). Picklable (a path),
    so worker processes can share one."""

    def __init__(self, folder: str | Path | None, source: str | Path | None = None, **fingerprint: Any) -> None:
        if source is not None:
            fingerprint["source"] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
        text = json.dumps(fingerprint, sort_keys=True, default=str)
        self.root = None if folder is None else Path(folder) / MEMO_DIR / hashlib.sha256(text.encode()).hexdigest()[:16]

    def value(self, key: str, fn: Callable[[], Any]) -> Any:
        """The value stored under ``key``, else ``fn()`` stored (JSON: dicts, lists, strings, numbers)."""
        if self.root is None:
            return fn()
        path = self._piece(key)
        found = _read(path)
        if found is not None and found.get("key") == key:
            return found["value"]
        value = fn()
        atomic_write_text(path, json.dumps({"key": key, "value": value}, allow_nan=True) + "\n")
        return value

    def pieces(self) -> int:
        """How many pieces an earlier run left (files that may or may not read back)."""
        return 0 if self.root is None or not self.root.is_dir() else sum(1 for _ in self.root.glob("*.json"))

    def folder(self, key: str) -> Path | None:
        """A folder for the files of piece ``key`` (a model's checkpoint), or None when nothing is kept."""
        return None if self.root is None else self.root / _checked(key)

    def _piece(self, key: str) -> Path:
        assert self.root is not None
        return self.root / f"{_checked(key)}.json"


def clear(out: str | Path) -> None:
    """Remove the memo of the claim folder ``out`` (after its result is durable)."""
    shutil.rmtree(Path(out) / MEMO_DIR, ignore_errors=True)


def _checked(key: str) -> str:
    if not _KEY.fullmatch(key):
        raise ValueError(f"Memo: expected a key of letters, digits, '.', '_' and '-', got {key!r}")
    return key


def _read(path: Path) -> dict | None:
    try:
        if path.stat().st_size > MAX_PIECE_BYTES:
            return None
        found = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, RecursionError):  # missing, unreadable, not UTF-8, not JSON
        return None
    return found if isinstance(found, dict) and "value" in found else None
