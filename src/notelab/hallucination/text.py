"""Text pieces every detector shares: sentences with their character spans, words, word n-grams.

Detectors score a passage sentence by sentence (SelfCheckGPT, Manakul et al. 2023, Sec. 5: "each
sentence is scored"), and token-level scores from a language model are mapped onto sentences by
character offsets, so the splitter returns spans into the original text, not copies. The splitter is a
rule-based one (no model download): it breaks after ``.``, ``!`` or ``?`` followed by white space,
except after a known abbreviation or a single capital initial, and at blank lines. The word tokeniser
gives spaCy's English tokens on plain prose (clitics split off, numbers and dotted names whole).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from notelab.core.errors import ConfigError

# A sentence ends at terminal punctuation (and any closing quotes / brackets after it) followed by white
# space, or at a blank line.
_BOUNDARY = re.compile(r"([.!?][\"')\]]*)\s+|\n\s*\n")
# Words that end with a period without ending the sentence.
_ABBREVIATIONS = frozenset(
    "e.g i.e etc vs mr mrs ms dr prof st jr sr no fig eq al approx cf dept est inc ltd co".split()
)
# spaCy-like English tokens: clitics split off ("do" "n't", "Python" "'s"), numbers and dotted names
# (os.path.join) kept whole, any other non-space character alone.
_WORD = re.compile(r"\w+(?=n['’]t\b)|n['’]t\b|['’](?:s|re|ve|ll|d|m)\b|\d+(?:[.,]\d+)+|\w+(?:\.\w+)+|\w+|[^\w\s]", re.I)


def _ends_with_abbreviation(text: str) -> bool:
    """True when ``text`` ends with ``abbrev.`` or a single capital initial (``J.``)."""
    m = re.search(r"(\S+)\.$", text)
    if m is None:
        return False
    word = m.group(1).lstrip("(\"'")
    return word.lower() in _ABBREVIATIONS or bool(re.fullmatch(r"[A-Z]", word))


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text``, white space excluded, in order."""
    cuts: list[tuple[int, int]] = []  # (end of this sentence, start of the next)
    start = 0
    for m in _BOUNDARY.finditer(text):
        end = m.end(1) if m.group(1) else m.start()
        if m.group(1) and _ends_with_abbreviation(text[start:end]):
            continue
        cuts.append((end, m.end()))
        start = m.end()
    out = []
    start = 0
    for end, nxt in [*cuts, (len(text), len(text))]:
        piece = text[start:end]
        if piece.strip():
            out.append((start + len(piece) - len(piece.lstrip()), end - (len(piece) - len(piece.rstrip()))))
        start = nxt
    return out


def split_sentences(text: str) -> list[str]:
    """The sentences of ``text`` (see :func:`sentence_spans`), stripped; empty text gives ``[]``."""
    return [text[a:b] for a, b in sentence_spans(text)]


def words(text: str, lowercase: bool = True) -> list[str]:
    """Word tokens (module docstring), lower-cased unless ``lowercase`` is False."""
    tokens = _WORD.findall(text)
    return [t.lower() for t in tokens] if lowercase else tokens


def ngrams(tokens: Sequence[str], n: int, pad: str = "<s>") -> list[tuple[str, ...]]:
    """The ``n``-grams ending at each token, left-padded with ``pad`` so that there is one per token
    (``nltk.util.ngrams(tokens, n, pad_left=True, left_pad_symbol=pad)``, which SelfCheckGPT uses)."""
    if n < 1:
        raise ConfigError(f"n-gram order must be >= 1, got {n}")
    padded = [pad] * (n - 1) + list(tokens)
    return [tuple(padded[i : i + n]) for i in range(len(tokens))]


_BULLET = re.compile(r"^\s*(?:[-*\u2022]|\d+[.)]|Q\d+[.:)])\s+")


def parse_list(text: str) -> list[str]:
    """The items of a model's list answer: one per non-empty line, list markers (``-``, ``*``, ``1.``,
    ``2)``, ``Q3:``) removed."""
    return [item for item in (_BULLET.sub("", line).strip() for line in text.splitlines()) if item]


__all__ = ["ngrams", "parse_list", "sentence_spans", "split_sentences", "words"]
