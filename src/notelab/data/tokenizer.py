"""Byte-level BPE tokenizer shared by every text model (Sennrich et al. 2016; GPT-2's byte-level variant).

BPE starts from the 256 byte values (so any text, in any script, encodes with no unknown token)
and repeatedly merges the most frequent adjacent pair into a new token until the vocabulary has
``vocab_size`` entries. Training and encoding run in Hugging Face ``tokenizers`` (Rust); the file
format is its ``tokenizer.json``, the one Llama 3 checkpoints ship, so an existing
``tokenizer.json`` loads the same way.

Special (control) tokens are put in by code only: ``encode(text)`` reads text that spells
``<|eot_id|>`` as its characters (ordinary byte-level tokens), so a prompt, a chat message or a
training document cannot inject a control id, and ``decode(encode(s)) == s`` for every string.
Code that builds a trusted template inserts the ids itself (``special_id``) or opts in with
``encode(template, allow_special=True)``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from notelab.core.errors import ConfigError, DataError
from notelab.core.io import atomic_write_text

PAD = "<|pad|>"
BOS = "<|begin_of_text|>"
EOS = "<|end_of_text|>"
# Llama 3 chat-format tokens, reserved in every tokenizer notelab trains so the chat template works.
CHAT_TOKENS = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
DEFAULT_SPECIALS = (PAD, BOS, EOS, *CHAT_TOKENS)


class Tokenizer:
    """Text <-> token ids. ``pad_id`` / ``bos_id`` / ``eos_id`` are ``None`` when the vocabulary lacks them."""

    def __init__(self, backend: _HFTokenizer) -> None:
        # The backend otherwise matches added special tokens inside any text it encodes (even with
        # add_special_tokens=False): with this set, their spelling in text is plain characters.
        backend.encode_special_tokens = True
        self.backend = backend
        # Read once: the backend rebuilds its vocabulary to count it (milliseconds at 128k tokens).
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self._added_ids = {t.content: i for i, t in added.items()}
        specials = {t.content: i for i, t in added.items() if t.special}
        # Longest first, so a special that is a prefix of another never wins the match.
        by_length = sorted(specials, key=len, reverse=True)
        self._special_re = re.compile("|".join(map(re.escape, by_length))) if specials else None
        self.pad_id = backend.token_to_id(PAD)
        self.bos_id = backend.token_to_id(BOS)
        self.eos_id = backend.token_to_id(EOS)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 4096,
        special_tokens: Sequence[str] = DEFAULT_SPECIALS,
        min_frequency: int = 2,
    ) -> Tokenizer:
        """Learn byte-level BPE merges on ``texts``; ids 0.. are the ``special_tokens`` in order."""
        if vocab_size < 256 + len(special_tokens):
            raise ConfigError(
                f"vocab_size must be at least {256 + len(special_tokens)} (bytes + specials), got {vocab_size}"
            )
        backend = _HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        backend.post_processor = processors.ByteLevel(trim_offsets=False)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=list(special_tokens),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(texts, trainer=trainer)
        return cls(backend)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> Tokenizer:
        """Load a ``tokenizer.json`` (a file, or a directory holding one)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"expected a tokenizer.json at {path}, found none")
        try:
            return cls(_HFTokenizer.from_file(str(path)))
        except Exception as e:  # the Rust side raises a bare Exception on malformed JSON
            raise DataError(f"{path}: not a valid tokenizer.json ({e})") from e

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (to ``path`` or into the directory ``path``) atomically."""
        path = Path(path)
        if path.is_dir() or not path.suffix:
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.backend.to_str(pretty=False))

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.backend.id_to_token(idx)

    def special_id(self, token: str) -> int:
        """The id of the token ``token`` (an added special token, or else a vocabulary entry), for
        code that builds templates; ConfigError if the tokenizer has no such token."""
        idx = self._added_ids.get(token)
        return self._need(idx if idx is not None else self.backend.token_to_id(token), token)

    def encode(
        self, text: str, add_bos: bool = False, add_eos: bool = False, *, allow_special: bool = False
    ) -> list[int]:
        """Token ids of ``text``, which is read as plain characters: text that spells a special
        token gets ordinary ids. ``allow_special=True`` (trusted templates only) maps the spelled
        special tokens to their ids instead."""
        if allow_special:
            ids = self._encode_trusted(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_bos:
            ids = [self._need(self.bos_id, BOS), *ids]
        if add_eos:
            ids = [*ids, self._need(self.eos_id, EOS)]
        return ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``encode`` of each text (plain characters, no special ids), in parallel."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def _encode_trusted(self, text: str) -> list[int]:
        # Split around the spelled specials and encode the pieces between them, as the backend
        # itself does with added tokens (each piece is pre-tokenized on its own).
        if self._special_re is None:
            return self.encode(text)
        pieces, specials, pos = [], [], 0
        for m in self._special_re.finditer(text):
            pieces.append(text[pos : m.start()])
            specials.append(self._added_ids[m.group()])
            pos = m.end()
        pieces.append(text[pos:])
        encoded = self.encode_batch(pieces)
        ids = list(encoded[0])
        for special, piece in zip(specials, encoded[1:]):
            ids += [special, *piece]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        n = self._vocab_size
        bad = [i for i in ids if not 0 <= int(i) < n]
        if bad:
            raise DataError(f"decode: token ids must be in [0, {n}), got {bad[:5]}")
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    @staticmethod
    def _need(idx: int | None, name: str) -> int:
        if idx is None:
            raise ConfigError(f"this tokenizer has no {name} token")
        return idx
