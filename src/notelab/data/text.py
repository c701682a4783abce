"""The Python standard library's own source as a text corpus, present on every machine that runs notelab.

Splits are by module (a hash of the module path), so no file is in both train and validation,
and they are the same on every machine with the same Python version.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from notelab.core.errors import ConfigError, DataError

SPLITS = ("train", "val", "all")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _in_val(rel: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha256(rel.encode()).digest()[:8], "big")
    return (h % 10_000) < val_fraction * 10_000


def stdlib_files(split: str = "all", val_fraction: float = 0.1, include_tests: bool = False) -> list[Path]:
    """The stdlib's ``.py`` files (sorted; no site-packages; tests only if asked), filtered by split."""
    if split not in SPLITS:
        raise ConfigError(f"split: expected one of {', '.join(SPLITS)}, got {split!r}")
    root = stdlib_root()
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in ("site-packages", "__pycache__", "idlelib", "turtledemo")
            and (include_tests or d not in ("test", "tests", "idle_test"))
        )
        for name in sorted(filenames):
            if not name.endswith(".py"):
                continue
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if split == "all" or (split == "val") == _in_val(rel, val_fraction):
                files.append(path)
    if not files:
        raise DataError(f"found no .py files under the standard library at {root}")
    return files


CHUNK_CHARS = 1 << 18  # characters decoded at a time when a file is scanned, not kept


def count_chars(path: Path) -> int:
    """Characters of a UTF-8 file (newlines translated as ``read_text`` does), read in chunks."""
    n = 0
    with open(path, encoding="utf-8") as f:
        while chunk := f.read(CHUNK_CHARS):
            n += len(chunk)
    return n


def read_spans(path: Path, spans: list[tuple[int, int | None]]) -> list[str]:
    """The characters ``[start, start + length)`` of a UTF-8 file for each (start, length) in
    ``spans`` (sorted, not overlapping; ``length=None``: to the end), in one pass that keeps only
    those characters, so a short prefix of a large file costs the prefix, not the file."""
    out = []
    pos = 0
    with open(path, encoding="utf-8") as f:
        for start, length in spans:
            if start < pos:
                raise ValueError(f"read_spans: expected sorted, non-overlapping spans, got {spans}")
            while pos < start and (skipped := len(f.read(min(CHUNK_CHARS, start - pos)))):
                pos += skipped
            text = f.read() if length is None else f.read(length)
            pos += len(text)
            out.append(text)
    return out


def read_texts(paths: list[Path], max_chars: int | None = None) -> Iterator[str]:
    """Yield each file's text until ``max_chars`` characters in all, reading each file only as
    far as needed; a file whose needed part does not decode as UTF-8 is skipped."""
    total = 0
    for path in paths:
        if max_chars is not None and total >= max_chars:
            return
        try:
            (text,) = read_spans(path, [(0, None if max_chars is None else max_chars - total)])
        except (UnicodeDecodeError, OSError):
            continue
        total += len(text)
        yield text


def stdlib_corpus(split: str = "train", max_chars: int | None = None, val_fraction: float = 0.1) -> str:
    """The stdlib source as one string, files separated by a blank line."""
    return "\n\n".join(read_texts(stdlib_files(split, val_fraction), max_chars))


@dataclass(frozen=True)
class FunctionRecord:
    module: str  # dotted module name, e.g. "json.decoder"
    name: str  # qualified name, e.g. "JSONDecoder.decode"
    signature: str  # "def decode(self, s, _w=WHITESPACE.match):"
    source: str  # the signature and the body, docstring removed
    docstring: str  # the cleaned docstring
    summary: str  # the docstring's first sentence


def _first_sentence(doc: str) -> str:
    line = " ".join(doc.strip().split("\n\n")[0].split())
    head, dot, _ = line.partition(". ")
    return head + "." if dot else line


def _functions(tree: ast.Module) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            yield node.name, node
        elif isinstance(node, ast.ClassDef):
            for sub in node.body:
                if isinstance(sub, ast.FunctionDef | ast.AsyncFunctionDef):
                    yield f"{node.name}.{sub.name}", sub


def stdlib_functions(
    split: str = "all", val_fraction: float = 0.1, max_source_chars: int = 4000
) -> list[FunctionRecord]:
    """Documented top-level functions and methods of the stdlib, deduplicated by source, split by module."""
    root = stdlib_root()
    seen: set[str] = set()
    records = []
    for path in stdlib_files(split, val_fraction):
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text)
        except (UnicodeDecodeError, SyntaxError, OSError, ValueError):
            continue
        module = path.relative_to(root).with_suffix("").as_posix().replace("/", ".").removesuffix(".__init__")
        lines = text.splitlines()
        for qualname, node in _functions(tree):
            doc = ast.get_docstring(node)
            if not doc or len(doc.split()) < 3 or len(node.body) < 2:
                continue
            # The signature runs from the `def` line to the line before the docstring.
            signature = "\n".join(lines[node.lineno - 1 : node.body[0].lineno - 1]).strip()
            src = "\n".join([signature] + lines[node.body[1].lineno - 1 : node.end_lineno])
            if len(src) > max_source_chars or src in seen:
                continue
            seen.add(src)
            records.append(FunctionRecord(module, qualname, signature, src, doc, _first_sentence(doc)))
    return records
