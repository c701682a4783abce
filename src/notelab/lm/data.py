"""Data for language models: packed token streams for pre-training, SFT and DPO examples.

Pre-training (LLaMA, Touvron et al. 2023, sec. 2.1): documents are tokenized, joined with an
end-of-text token into one stream ``x_1 .. x_N``, and a batch is ``B`` random windows
``x_{s .. s+T}`` of ``T + 1`` tokens (inputs ``x_{s..s+T-1}``, targets shifted by one), with the
start ``s`` drawn uniformly (nanoGPT's ``get_batch``). Validation text is held out by file.

Post-training examples are JSONL, one object per line:

    SFT:  {"prompt": ..., "response": ...}
    DPO:  {"prompt": ..., "chosen": ..., "rejected": ...}

A tokenized example is ``input_ids`` with ``labels`` equal to ``input_ids`` on the response
tokens and ``IGNORE_INDEX`` on the prompt and padding, so a loss over ``labels`` is a loss over
the response only. The built-in preference set comes from the standard library: prompt = a
function's signature, chosen = its real docstring summary, rejected = another function's.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch
from torch.utils.data import Dataset

from notelab.core.errors import ConfigError, DataError
from notelab.data.text import count_chars, read_spans, read_texts, stdlib_files, stdlib_functions
from notelab.data.tokenizer import Tokenizer

IGNORE_INDEX = -100  # label of a position that is not scored (prompt, padding); PyTorch's cross_entropy default
_R = TypeVar("_R")  # what a reader returns
TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst", ".json", ".c", ".h", ".js", ".html", ".tex", ".csv")


# ---------------------------------------------------------------------------------------------
# Raw text and its train / validation split


def _is_val(name: str, val_fraction: float) -> bool:
    """Deterministic split by a hash of the file name, so a file is never in both splits."""
    h = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
    return (h % 10_000) < val_fraction * 10_000


def text_splits(
    data: str | os.PathLike, max_chars: int | None = None, val_fraction: float = 0.1
) -> tuple[list[str], list[str]]:
    """(train texts, val texts) of ``data``: ``"stdlib"``, a text file, or a directory of text files.

    The stdlib and directories are split by file; a single file by its last ``val_fraction`` of
    characters. ``max_chars`` caps the training text (validation gets a tenth of it).
    """
    val_chars = None if max_chars is None else max(1, max_chars // 10)
    if str(data) == "stdlib":
        train = list(read_texts(stdlib_files("train", val_fraction), max_chars))
        val = list(read_texts(stdlib_files("val", val_fraction), val_chars))
        return train, val
    path = Path(data)
    if path.is_file():
        # Streamed: one pass counts the characters, one keeps only the two parts used, so
        # max_chars of a large file costs max_chars, not the file.
        n = _read(path, count_chars)
        cut = int(n * (1 - val_fraction))
        train_len = cut if max_chars is None else min(cut, max_chars)
        train, val = _read(path, lambda p: read_spans(p, [(0, train_len), (cut, val_chars)]))
        if not train.strip() or not val.strip():
            raise DataError(f"{path}: expected enough text for a train and a validation part, got {n} chars")
        return [train], [val]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(f"{path}: expected text files ({', '.join(TEXT_SUFFIXES)}), found none")
        is_val = [_is_val(p.relative_to(path).as_posix(), val_fraction) for p in files]
        val_files = [p for p, v in zip(files, is_val) if v]
        train_files = [p for p, v in zip(files, is_val) if not v]
        if not val_files:  # few files: hold out the last one so validation is never empty
            train_files, val_files = train_files[:-1] or train_files, train_files[-1:]
        train, val = list(read_texts(train_files, max_chars)), list(read_texts(val_files, val_chars))
        if not any(t.strip() for t in train) or not any(t.strip() for t in val):
            raise DataError(f"{path}: expected readable UTF-8 text in its files, found none")
        return train, val
    raise DataError(f"--data: expected 'stdlib', a text file or a directory of text files, got {str(data)!r}")


def _read(path: Path, reader: Callable[[Path], _R]) -> _R:
    """``reader(path)`` with a file that is not UTF-8 text (or not readable) as a DataError."""
    try:
        return reader(path)
    except (UnicodeDecodeError, OSError) as e:
        raise DataError(f"{path}: expected a UTF-8 text file ({e})") from e


def train_tokenizer(
    texts: Sequence[str], vocab_size: int = 4096, out_dir: str | os.PathLike | None = None
) -> Tokenizer:
    """Byte-level BPE on ``texts`` (the training split only), saved as ``out_dir/tokenizer.json``."""
    tokenizer = Tokenizer.train(texts, vocab_size=vocab_size)
    if out_dir is not None:
        tokenizer.save(Path(out_dir))
    return tokenizer


def encode_stream(tokenizer: Tokenizer, texts: Iterable[str]) -> torch.Tensor:
    """One int32 stream ``(N,)``: each document as begin-of-text, its tokens, end-of-text (the
    markers the tokenizer has), so prompts that start with begin-of-text look like pre-training."""
    texts = [t for t in texts if t]
    head = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    tail = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    ids: list[int] = []
    for doc in tokenizer.encode_batch(texts):
        ids.extend(head + doc + tail)
    if not ids:
        raise DataError("expected some text to tokenize, got none")
    return torch.tensor(ids, dtype=torch.int32)


@dataclass
class PackedStream:
    """``fit`` batch source: ``(batch_size, seq_len + 1)`` random windows of a token stream.

    ``stream(step, generator)`` draws the window starts from ``generator`` alone, so the batches
    are a pure function of fit's (seed, step) and resume exactly.
    """

    tokens: torch.Tensor  # (N,) integer ids
    seq_len: int  # T: model inputs per window (targets are the next T tokens)
    batch_size: int

    def __post_init__(self) -> None:
        if self.tokens.dim() != 1:
            raise DataError(f"tokens: expected a 1-D stream, got shape {tuple(self.tokens.shape)}")
        if self.seq_len < 1 or self.batch_size < 1:
            raise ConfigError(f"seq_len and batch_size: expected >= 1, got {self.seq_len} and {self.batch_size}")
        if self.tokens.numel() < self.seq_len + 1:
            raise DataError(
                f"token stream: expected at least seq_len + 1 = {self.seq_len + 1} tokens, got {self.tokens.numel()}"
            )

    def __call__(self, step: int, generator: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, self.tokens.numel() - self.seq_len, (self.batch_size,), generator=generator)
        offsets = torch.arange(self.seq_len + 1)
        return self.tokens[starts[:, None] + offsets].long()


def eval_windows(tokens: torch.Tensor, seq_len: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping ``(W, seq_len + 1)`` windows; consecutive windows share one boundary token,
    so every token after the first is a target exactly once."""
    n = (tokens.numel() - 1) // seq_len
    if n < 1:
        raise DataError(f"evaluation stream: expected at least {seq_len + 1} tokens, got {tokens.numel()}")
    if max_windows is not None:
        n = min(n, max_windows)
    idx = torch.arange(n)[:, None] * seq_len + torch.arange(seq_len + 1)
    return tokens[idx].long()


# ---------------------------------------------------------------------------------------------
# SFT and DPO examples


@dataclass(frozen=True)
class SFTExample:
    prompt: str
    response: str


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str


def _read_jsonl(path: str | os.PathLike, fields: tuple[str, ...]) -> list[dict[str, str]]:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"expected a JSONL file at {path}, found none")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: expected a JSON object, got invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            missing = [k for k in fields if k not in obj]
            if missing:
                raise DataError(f"{path}:{lineno}: expected keys {', '.join(fields)}; missing {', '.join(missing)}")
            bad = [k for k in fields if not isinstance(obj[k], str)]
            if bad:
                raise DataError(
                    f"{path}:{lineno}: expected string values, got {type(obj[bad[0]]).__name__} for {bad[0]!r}"
                )
            rows.append({k: obj[k] for k in fields})
    if not rows:
        raise DataError(f"{path}: expected at least one JSON line, found none")
    return rows


def load_sft_jsonl(path: str | os.PathLike) -> list[SFTExample]:
    """``{"prompt", "response"}`` per line; a malformed line is a :class:`DataError` naming its number."""
    return [SFTExample(**r) for r in _read_jsonl(path, ("prompt", "response"))]


def load_preference_jsonl(path: str | os.PathLike) -> list[PreferencePair]:
    """``{"prompt", "chosen", "rejected"}`` per line; a malformed line is a :class:`DataError` naming its number."""
    return [PreferencePair(**r) for r in _read_jsonl(path, ("prompt", "chosen", "rejected"))]


def stdlib_preference_pairs(split: str = "train", n: int | None = None, seed: int = 0) -> list[PreferencePair]:
    """The built-in set: prompt = a stdlib function's signature plus a newline, chosen = its
    docstring summary, rejected = the summary of another function (a random derangement)."""
    records = stdlib_functions(split)
    rng = random.Random(seed)
    records = [r for r in records if r.summary.strip()]
    rng.shuffle(records)
    if n is not None:
        records = records[:n]
    if len(records) < 2:
        raise DataError(f"stdlib {split} split: expected at least 2 documented functions, got {len(records)}")
    # Pair each function with the next one's summary after the shuffle: never its own.
    others = records[1:] + records[:1]
    return [
        PreferencePair(prompt=_prompt(r.signature), chosen=r.summary, rejected=o.summary)
        for r, o in zip(records, others)
        if o.summary != r.summary
    ]


def stdlib_sft_examples(split: str = "train", n: int | None = None, seed: int = 0) -> list[SFTExample]:
    """Signature -> docstring summary, from the same records as :func:`stdlib_preference_pairs`."""
    return [SFTExample(p.prompt, p.chosen) for p in stdlib_preference_pairs(split, n, seed)]


def _prompt(signature: str) -> str:
    # The docstring follows the signature on an indented line, as in the source the model saw.
    return signature + '\n    """'


def encode_example(
    tokenizer: Tokenizer, prompt: str, response: str, max_len: int, add_eos: bool = True
) -> tuple[list[int], int]:
    """(token ids, number of prompt tokens); prompt and response are tokenized separately so the
    boundary is exact. Too long: the prompt is cut from the left, then the response on the right."""
    p = tokenizer.encode(prompt, add_bos=tokenizer.bos_id is not None)
    r = tokenizer.encode(response, add_eos=add_eos and tokenizer.eos_id is not None)
    if not r:
        raise DataError(f"expected a non-empty response, got {response!r}")
    keep_prompt = max(1, min(len(p), max_len - min(len(r), max_len // 2)))
    p = p[len(p) - keep_prompt :]
    r = r[: max_len - len(p)]
    return p + r, len(p)


def pad_examples(examples: Sequence[tuple[list[int], int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to one length: ``input_ids`` and ``labels`` (``IGNORE_INDEX`` on prompt and padding).

    Right padding needs no attention mask in a causal model: padding comes after every real token.
    """
    length = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])
    return {"input_ids": input_ids, "labels": labels}


class TensorDictDataset(Dataset):
    """Rows of equal-length tensors, served as dicts (``fit`` collates them into a batch)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        sizes = {len(t) for t in tensors.values()}
        if len(sizes) != 1:
            raise DataError(f"expected tensors with one number of rows, got {sorted(sizes)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}


def _pad_id(tokenizer: Tokenizer) -> int:
    return tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)


def sft_dataset(tokenizer: Tokenizer, examples: Sequence[SFTExample], max_len: int) -> TensorDictDataset:
    """``input_ids`` / ``labels`` rows for :func:`notelab.lm.posttrain.sft_loss`."""
    if not examples:
        raise DataError("SFT: expected at least one example, got none")
    encoded = [encode_example(tokenizer, e.prompt, e.response, max_len) for e in examples]
    return TensorDictDataset(pad_examples(encoded, _pad_id(tokenizer)))


def preference_dataset(tokenizer: Tokenizer, pairs: Sequence[PreferencePair], max_len: int) -> TensorDictDataset:
    """``chosen_ids`` / ``chosen_labels`` / ``rejected_ids`` / ``rejected_labels`` rows for DPO."""
    if not pairs:
        raise DataError("DPO: expected at least one preference pair, got none")
    pad = _pad_id(tokenizer)
    chosen = pad_examples([encode_example(tokenizer, p.prompt, p.chosen, max_len) for p in pairs], pad)
    rejected = pad_examples([encode_example(tokenizer, p.prompt, p.rejected, max_len) for p in pairs], pad)
    return TensorDictDataset(
        {
            "chosen_ids": chosen["input_ids"],
            "chosen_labels": chosen["labels"],
            "rejected_ids": rejected["input_ids"],
            "rejected_labels": rejected["labels"],
        }
    )
