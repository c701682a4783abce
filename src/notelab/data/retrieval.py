"""BM25 retrieval over a knowledge source given as a folder of text, Markdown or JSONL files.

Okapi BM25 (Robertson & Zaragoza 2009, "The Probabilistic Relevance Framework: BM25 and Beyond",
eq. 3.15 in Lucene's variant) scores a passage ``D`` for a query ``Q`` as

    score(D, Q) = sum_{q in Q} IDF(q) * f(q, D) (k1 + 1) / (f(q, D) + k1 (1 - b + b |D| / avgdl))

with ``f(q, D)`` the count of term ``q`` in ``D``, ``k1 = 1.5``, ``b = 0.75``. The index and the
scoring are the ``bm25s`` package's (Lu 2024, "BM25S: Orders of magnitude faster lexical search via
eager sparse scoring"); terms are lower-cased words of two or more letters, English stop words removed.
FActScore (Min et al. 2023, sec. 3.3) retrieves passages this way before judging each atomic fact.

Sources: ``*.txt`` / ``*.md`` files are cut into passages of about ``chunk_words`` words (paragraphs
packed together, a longer paragraph split), each named ``file:line``; a ``*.jsonl`` file gives one
passage per row, ``{"text": ..., "title": optional, "source": optional}`` (the title is put before the
text, as FActScore's passages carry their article's title).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from notelab.core.errors import ConfigError, DataError

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"


@dataclass(frozen=True)
class Passage:
    """A retrieved passage: its text, where it came from (``file:line`` or the row's ``source``), its BM25 score."""

    text: str
    source: str
    score: float


def chunk_text(text: str, chunk_words: int) -> list[tuple[int, str]]:
    """``text`` -> ``(first line number, passage)`` pairs of at most ``chunk_words`` words each.

    Blank lines end paragraphs; consecutive paragraphs share a passage while they fit, so a passage
    rarely cuts a sentence; a paragraph longer than ``chunk_words`` is cut every ``chunk_words`` words.
    """
    paragraphs: list[tuple[int, list[str]]] = []
    start, words = 0, []
    for number, line in enumerate(text.splitlines(), start=1):
        line_words = line.split()
        if not line_words:
            if words:
                paragraphs.append((start, words))
            start, words = 0, []
            continue
        start = start or number
        words.extend(line_words)
    if words:
        paragraphs.append((start, words))
    out: list[tuple[int, list[str]]] = []
    for line, words in paragraphs:
        if out and len(out[-1][1]) + len(words) <= chunk_words:
            out[-1][1].extend(words)
            continue
        for i in range(0, len(words), chunk_words):
            out.append((line, words[i : i + chunk_words]))
    return [(line, " ".join(words)) for line, words in out]


def _read_text(path: Path, shown: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{shown}: expected UTF-8 text, got undecodable bytes at offset {e.start}") from e


def _jsonl_rows(path: Path, shown: str) -> Iterator[tuple[str, str]]:
    """(text, source) per row of a JSONL file; a bad row raises a DataError naming ``file:line``."""
    for number, line in enumerate(_read_text(path, shown).splitlines(), start=1):
        if not line.strip():
            continue
        where = f"{shown}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{where}: expected a JSON object, got malformed JSON ({e.msg})") from e
        if not isinstance(row, dict) or not isinstance(row.get("text"), str) or not row["text"].strip():
            got = f"keys {sorted(row)[:6]}" if isinstance(row, dict) else type(row).__name__
            raise DataError(f'{where}: expected an object with a non-empty string "text", got {got}')
        for key in ("title", "source"):
            if row.get(key) is not None and not isinstance(row[key], str):
                raise DataError(f'{where}: expected "{key}" to be a string, got {type(row[key]).__name__}')
        title = (row.get("title") or "").strip()
        text = f"{title}\n{row['text'].strip()}" if title else row["text"].strip()
        yield text, row.get("source") or where


def _folder_passages(root: Path, chunk_words: int) -> tuple[list[str], list[str]]:
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    texts: list[str] = []
    sources: list[str] = []
    for path in files:
        shown = path.name if path == root else path.relative_to(root).as_posix()
        suffix = path.suffix.lower()
        if suffix == JSONL_SUFFIX:
            for text, source in _jsonl_rows(path, shown):
                texts.append(text)
                sources.append(source)
        elif suffix in TEXT_SUFFIXES:
            for line, text in chunk_text(_read_text(path, shown), chunk_words):
                texts.append(text)
                sources.append(f"{shown}:{line}")
    return texts, sources


def _bm25s() -> ModuleType:
    """``bm25s``, imported on first use rather than with ``notelab.data``.

    Its import runs a JAX top-k when JAX is installed, and JAX's first use on a machine with a GPU takes
    75% of that GPU's memory (measured on an H200: 105 GB, which made every torch job beside it run out of
    memory). Unless the user chose JAX's platforms, JAX is kept on the CPU for it; queries use the
    numpy top-k (``backend_selection="numpy"`` in :meth:`BM25Index.search`).
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bm25s

    return bm25s


class BM25Index:
    """Passages and their BM25 index (module docstring); ``search(query, k)`` returns the best ``k``."""

    def __init__(self, texts: list[str], sources: list[str]) -> None:
        self.texts, self.sources = texts, sources
        bm25s = _bm25s()
        tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
        if all(len(ids) == 0 for ids in tokens.ids):
            raise DataError(
                f"BM25Index: expected passages with indexable words, got {len(texts)} passages of stop words, "
                "one-letter words or punctuation only"
            )
        self._retriever = bm25s.BM25()
        self._retriever.index(tokens, show_progress=False)

    @classmethod
    def from_texts(cls, texts: Sequence[str], sources: Sequence[str] | None = None) -> BM25Index:
        """One passage per text, named by ``sources`` (default: its position, ``"0"``, ``"1"``, ...)."""
        texts = list(texts)
        if not texts:
            raise DataError("BM25Index.from_texts: expected at least one passage, got none (an empty source)")
        bad = next((i for i, t in enumerate(texts) if not isinstance(t, str) or not t.strip()), None)
        if bad is not None:
            raise DataError(f"BM25Index.from_texts: expected non-empty strings, got {texts[bad]!r} at index {bad}")
        sources = [str(i) for i in range(len(texts))] if sources is None else [str(s) for s in sources]
        if len(sources) != len(texts):
            raise ConfigError(
                f"BM25Index.from_texts: expected one source per text, got {len(sources)} for {len(texts)} texts"
            )
        return cls(texts, sources)

    @classmethod
    def from_folder(cls, path: str | os.PathLike, chunk_words: int = 100) -> BM25Index:
        """Every ``*.txt`` / ``*.md`` / ``*.jsonl`` under ``path`` (a folder, searched recursively, or one file)."""
        if isinstance(chunk_words, bool) or not isinstance(chunk_words, int) or chunk_words < 1:
            raise ConfigError(f"BM25Index.from_folder: expected chunk_words a positive integer, got {chunk_words!r}")
        root = Path(path)
        if not root.exists():
            raise DataError(f"BM25Index.from_folder: expected a folder or file of passages, got {str(path)!r} (absent)")
        texts, sources = _folder_passages(root, chunk_words)
        if not texts:
            kinds = "/".join((*TEXT_SUFFIXES, JSONL_SUFFIX))
            raise DataError(f"BM25Index.from_folder: expected {kinds} files with text under {str(path)!r}, got none")
        return cls(texts, sources)

    def __len__(self) -> int:
        return len(self.texts)

    def search(self, query: str, k: int = 5) -> list[Passage]:
        """The at most ``k`` best passages for ``query``, best first; passages sharing no term with it are left
        out (a score of 0 is no evidence), so fewer than ``k`` come back for a query the source does not cover."""
        if not isinstance(query, str):
            raise ConfigError(f"BM25Index.search: expected a string query, got {type(query).__name__}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ConfigError(f"BM25Index.search: expected k a positive integer, got {k!r}")
        terms = _bm25s().tokenize([query], stopwords="en", show_progress=False, return_ids=False)
        if not terms[0]:
            return []
        ids, scores = self._retriever.retrieve(
            terms, k=min(k, len(self)), show_progress=False, backend_selection="numpy"
        )
        return [
            Passage(self.texts[i], self.sources[i], float(s))
            for i, s in zip(ids[0].tolist(), scores[0].tolist())
            if s > 0
        ]


__all__ = ["BM25Index", "Passage", "chunk_text"]
