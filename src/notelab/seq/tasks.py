"""Sequence-to-sequence tasks: synthetic long-range tasks with a length knob, and stdlib code summarisation.

Every task is a batch source ``task(step, generator) -> (src, tgt_in, tgt_out)`` that
``notelab.train.fit`` takes as ``data``, with teacher forcing laid out as::

    src      x_1 ... x_L                     (B, L)   encoder input
    tgt_in   BOS y_1 ... y_M                 (B, M+1) decoder input (targets shifted right)
    tgt_out  y_1 ... y_M EOS                 (B, M+1) what the decoder must predict

Synthetic tasks (one fixed vocabulary, ``SYNTH_VOCAB_SIZE`` ids; PAD 0, BOS 1, EOS 2):

- ``copy``: y = x, symbols drawn uniformly from ``n_symbols`` digits. The output at step i
  depends on the input at distance L (encoder) -- a pure memory task.
- ``reverse``: y = x reversed; y_1 depends on x_L, y_L on x_1.
- ``adding``: the adding problem (Hochreiter & Schmidhuber 1997, "Long Short-Term Memory",
  Sec. 5, Experiment 4), discretised so that both model kinds solve it as seq2seq. Each input
  position holds a (value, marker) pair with value v in {0..9} and marker in {0, 1}, written as
  one token (``DIGIT + v`` unmarked, ``MARKED + v`` marked). Exactly two positions are marked:
  the first among the first ``max(1, L // 10)`` positions (as in the paper, so that the
  dependency spans the whole sequence), the second anywhere after it. The target is the sum of
  the two marked values, 0..18, written as two decimal digits then EOS (e.g. 7 -> "0 7").

Accuracy is sequence exact match (every target token right, EOS included) and token accuracy.

The real task, ``stdlib-doc``: Python standard library function source -> the first sentence of
its docstring (``notelab.data.text.stdlib_functions``: the docstring removed from the source, the
split by module file, so no module is in both train and test; test functions whose source also
occurs in train are dropped). Both sides are tokenised by a byte-level BPE ``Tokenizer`` trained
on the training split only and cached as ``tokenizer.json`` in the run directory; sources are
truncated to ``max_src_len`` tokens and summaries to ``max_tgt_len``. Scored by corpus BLEU
(Papineni et al. 2002, via sacrebleu) and exact match of the detokenised summary.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from notelab.core.errors import ConfigError, DataError, ShapeError, unknown_name
from notelab.core.io import atomic_write_text

if TYPE_CHECKING:
    from notelab.data.tokenizer import Tokenizer

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
DIGIT = 3  # ids 3..12: the digits / symbols 0..9
MARKED = 13  # ids 13..22: the adding problem's marked values 0..9
SYNTH_VOCAB_SIZE = 23
SYNTHETIC_TASKS = ("copy", "reverse", "adding")
TASKS = (*SYNTHETIC_TASKS, "stdlib-doc")

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def shift_right(y: torch.Tensor, bos_id: int = BOS_ID, eos_id: int = EOS_ID, pad_id: int = PAD_ID) -> Batch:
    """Targets ``y`` (B, M) padded with ``pad_id`` -> (tgt_in, tgt_out) of (B, M+1), EOS after the last real token."""
    b = y.shape[0]
    lengths = (y != pad_id).sum(1)
    tgt_out = torch.cat([y, torch.full((b, 1), pad_id, dtype=y.dtype)], 1)
    tgt_out[torch.arange(b), lengths] = eos_id
    tgt_in = torch.cat([torch.full((b, 1), bos_id, dtype=y.dtype), tgt_out[:, :-1]], 1)
    tgt_in[tgt_in == eos_id] = pad_id
    return y, tgt_in, tgt_out


@dataclass
class SyntheticTask:
    """A synthetic long-range task of source length ``length`` (see the module docstring)."""

    name: str  # "copy" | "reverse" | "adding"
    length: int  # L, the source length (the dependency length)
    batch_size: int = 32
    n_symbols: int = 10  # copy / reverse alphabet size, at most 10

    def __post_init__(self) -> None:
        if self.name not in SYNTHETIC_TASKS:
            raise unknown_name("task", self.name, TASKS)
        if not isinstance(self.length, int) or self.length < (2 if self.name == "adding" else 1):
            raise ConfigError(
                f"{self.name}: expected a length >= {2 if self.name == 'adding' else 1}, got {self.length!r}"
            )
        if self.batch_size < 1:
            raise ConfigError(f"{self.name}: expected batch_size >= 1, got {self.batch_size}")
        if not 2 <= self.n_symbols <= 10:
            raise ConfigError(f"{self.name}: expected n_symbols in 2..10, got {self.n_symbols}")

    vocab = SYNTH_VOCAB_SIZE  # ids in use, the model's vocabulary
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    @property
    def src_len(self) -> int:
        return self.length

    @property
    def tgt_len(self) -> int:
        """Decoder length including BOS / EOS."""
        return 3 if self.name == "adding" else self.length + 1

    def sample(self, batch_size: int, generator: torch.Generator) -> Batch:
        """``batch_size`` fresh examples ``(src, tgt_in, tgt_out)`` drawn with ``generator`` (CPU)."""
        b, n = batch_size, self.length
        if self.name == "adding":
            values = torch.randint(0, 10, (b, n), generator=generator)
            first_span = max(1, n // 10)
            first = torch.randint(0, first_span, (b,), generator=generator)
            # second marker uniformly in (first, n): offset 1..n-1-first
            u = torch.rand(b, generator=generator)
            second = first + 1 + (u * (n - 1 - first)).long()
            rows = torch.arange(b)
            src = DIGIT + values
            src[rows, first] += MARKED - DIGIT
            src[rows, second] += MARKED - DIGIT
            total = values[rows, first] + values[rows, second]
            y = torch.stack([DIGIT + total // 10, DIGIT + total % 10], 1)
        else:
            src = DIGIT + torch.randint(0, self.n_symbols, (b, n), generator=generator)
            y = src if self.name == "copy" else src.flip(1)
        _, tgt_in, tgt_out = shift_right(y.clone())
        return src, tgt_in, tgt_out

    def __call__(self, step: int, generator: torch.Generator) -> Batch:
        return self.sample(self.batch_size, generator)

    def spec(self) -> dict[str, Any]:
        return {"task": self.name, **asdict(self)}

    def encode_input(self, text: str) -> torch.Tensor:
        """Space-separated token ids -> ``(1, L)`` source; checks vocabulary and length."""
        parts = text.split()
        if not parts:
            raise ShapeError(f"{self.name}: expected a non-empty space-separated list of token ids, got {text!r}")
        try:
            ids = [int(p) for p in parts]
        except ValueError as e:
            raise DataError(f"{self.name}: expected integer token ids separated by spaces, got {text!r}") from e
        bad = [i for i in ids if not 0 <= i < SYNTH_VOCAB_SIZE]
        if bad:
            raise DataError(f"{self.name}: token ids must be in [0, {SYNTH_VOCAB_SIZE}), got {bad[:5]}")
        return torch.tensor([ids])

    def decode_output(self, ids: Sequence[int]) -> str:
        return " ".join(str(int(i)) for i in strip_special(ids))


def strip_special(ids: Sequence[int], eos_id: int = EOS_ID, pad_id: int = PAD_ID, bos_id: int = BOS_ID) -> list[int]:
    """Token ids up to the first EOS, without PAD / BOS."""
    out = []
    for i in ids:
        i = int(i)
        if i == eos_id:
            break
        if i not in (pad_id, bos_id):
            out.append(i)
    return out


def sequence_accuracy(pred: torch.Tensor, tgt_out: torch.Tensor, pad_id: int = PAD_ID) -> tuple[float, float]:
    """(exact match, token accuracy) of predicted ids against ``tgt_out`` over its non-pad positions.

    ``pred`` (B, T') is cut or padded to ``tgt_out``'s T; a sequence counts as right only when every
    non-pad target token (EOS included) is right.
    """
    if pred.dim() != 2 or tgt_out.dim() != 2 or pred.shape[0] != tgt_out.shape[0]:
        raise ShapeError(
            f"sequence_accuracy: expected (B, T) tensors, got {tuple(pred.shape)} and {tuple(tgt_out.shape)}"
        )
    t = tgt_out.shape[1]
    if pred.shape[1] < t:
        pred = torch.cat([pred, torch.full((pred.shape[0], t - pred.shape[1]), -1, dtype=pred.dtype)], 1)
    pred = pred[:, :t].to(tgt_out.device)
    real = tgt_out != pad_id
    hit = (pred == tgt_out) & real
    token_acc = hit.sum().item() / max(1, real.sum().item())
    exact = (hit | ~real).all(1).float().mean().item()
    return exact, token_acc


# ---------------------------------------------------------------- stdlib code summarisation


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU in [0, 100] (sacrebleu defaults: 13a tokenisation, 4-grams, brevity penalty)."""
    import sacrebleu

    if len(hypotheses) != len(references):
        raise ShapeError(
            f"corpus_bleu: expected as many hypotheses as references, got {len(hypotheses)} and {len(references)}"
        )
    if not references:
        raise DataError("corpus_bleu: expected at least one reference, got none")
    return float(sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score)


def exact_match(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of hypotheses equal to their reference after whitespace normalisation."""
    if not references:
        raise DataError("exact_match: expected at least one reference, got none")
    return sum(" ".join(h.split()) == " ".join(r.split()) for h, r in zip(hypotheses, references)) / len(references)


@functools.lru_cache(maxsize=4)
def _functions(split: str) -> tuple:
    from notelab.data.text import stdlib_functions

    return tuple(stdlib_functions(split))


def stdlib_doc_split(max_train: int | None = None, max_test: int | None = None) -> tuple[list, list]:
    """(train, test) ``FunctionRecord`` lists: split by module, test sources that occur in train dropped.

    ``max_*`` keep an evenly spaced subset (deterministic), for small runs and tests.
    """
    train = list(_functions("train"))
    seen = {r.source for r in train}
    test = [r for r in _functions("val") if r.source not in seen]
    if not train or not test:
        raise DataError(f"stdlib-doc: expected functions in both splits, got {len(train)} train and {len(test)} test")
    return _subset(train, max_train), _subset(test, max_test)


def _subset(records: list, n: int | None) -> list:
    if n is None or n >= len(records):
        return records
    stride = len(records) / n
    return [records[int(i * stride)] for i in range(n)]


@dataclass
class StdlibDocTask:
    """Function source -> first docstring sentence on the stdlib (see the module docstring)."""

    run_dir: str | None = None  # where tokenizer.json is cached; None: trained in memory
    vocab_size: int = 4096  # BPE vocabulary, shared by source and summary
    max_src_len: int = 256  # source tokens kept (the rest truncated)
    max_tgt_len: int = 32  # summary tokens kept, before EOS
    batch_size: int = 32
    max_train: int | None = None  # keep this many training functions (None: all ~5k)
    max_test: int | None = 500  # test functions scored
    name: str = field(default="stdlib-doc", init=False)

    def __post_init__(self) -> None:
        if self.max_src_len < 1 or self.max_tgt_len < 1:
            raise ConfigError(f"stdlib-doc: expected max lengths >= 1, got {self.max_src_len}, {self.max_tgt_len}")
        self.tokenizer = self._tokenizer()
        self.pad_id, self.bos_id, self.eos_id = self.tokenizer.pad_id, self.tokenizer.bos_id, self.tokenizer.eos_id

    @functools.cached_property
    def _records(self) -> tuple[list, list]:
        return stdlib_doc_split(self.max_train, self.max_test)

    @property
    def train_records(self) -> list:
        return self._records[0]

    @property
    def test_records(self) -> list:
        return self._records[1]

    @functools.cached_property
    def _train_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        src = self._pad([self.encode_source(r.source) for r in self.train_records], self.max_src_len)
        ys = [self.tokenizer.encode(r.summary)[: self.max_tgt_len] for r in self.train_records]
        return src, self._pad(ys, self.max_tgt_len)

    def _tokenizer(self) -> Tokenizer:
        from notelab.data.tokenizer import Tokenizer

        # Loading a cached tokenizer never touches the data: `translate` only needs this file.
        path = Path(self.run_dir) / "tokenizer.json" if self.run_dir is not None else None
        if path is not None and path.is_file():
            return Tokenizer.from_file(path)
        texts = [r.source for r in self.train_records] + [r.summary for r in self.train_records]
        tok = Tokenizer.train(texts, vocab_size=self.vocab_size)
        if path is not None:
            tok.save(path)
        return tok

    @property
    def src_len(self) -> int:
        return self.max_src_len

    @property
    def tgt_len(self) -> int:
        return self.max_tgt_len + 1

    def encode_source(self, source: str) -> list[int]:
        return self.tokenizer.encode(source)[: self.max_src_len]

    def _pad(self, seqs: list[list[int]], length: int) -> torch.Tensor:
        out = torch.full((len(seqs), length), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        return out

    def _batch(self, src: torch.Tensor, y: torch.Tensor) -> Batch:
        # Trim the common padding so that short batches cost less.
        src = src[:, : max(1, int((src != self.pad_id).sum(1).max()))]
        y = y[:, : max(1, int((y != self.pad_id).sum(1).max()))]
        _, tgt_in, tgt_out = shift_right(y.clone(), self.bos_id, self.eos_id, self.pad_id)
        return src, tgt_in, tgt_out

    def __call__(self, step: int, generator: torch.Generator) -> Batch:
        src, y = self._train_tensors
        idx = torch.randint(0, src.shape[0], (self.batch_size,), generator=generator)
        return self._batch(src[idx], y[idx])

    def test_batches(self, batch_size: int = 64) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """Yield ``(src, references)`` over the test functions, in order."""
        recs = self.test_records
        for i in range(0, len(recs), batch_size):
            chunk = recs[i : i + batch_size]
            src = self._pad([self.encode_source(r.source) for r in chunk], self.max_src_len)
            src = src[:, : max(1, int((src != self.pad_id).sum(1).max()))]
            yield src, [r.summary for r in chunk]

    def encode_input(self, text: str) -> torch.Tensor:
        if not text.strip():
            raise ShapeError("stdlib-doc: expected non-empty Python source, got an empty string")
        return torch.tensor([self.encode_source(text)])

    def decode_output(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(strip_special(ids, self.eos_id, self.pad_id, self.bos_id)).strip()

    @property
    def vocab(self) -> int:
        return self.tokenizer.vocab_size

    def spec(self) -> dict[str, Any]:
        keys = ("vocab_size", "max_src_len", "max_tgt_len", "batch_size", "max_train", "max_test")
        return {"task": self.name, **{k: getattr(self, k) for k in keys}}


def make_task(
    name: str, *, length: int = 16, batch_size: int = 32, run_dir: str | os.PathLike | None = None, **kw: Any
) -> SyntheticTask | StdlibDocTask:
    """A task by name: ``SyntheticTask(name, length, ...)`` or ``StdlibDocTask(run_dir, ...)``."""
    if name in SYNTHETIC_TASKS:
        return SyntheticTask(name, length, batch_size, **kw)
    if name == "stdlib-doc":
        return StdlibDocTask(run_dir=None if run_dir is None else str(run_dir), batch_size=batch_size, **kw)
    raise unknown_name("task", name, TASKS)


def save_task(task: Any, run_dir: str | os.PathLike) -> None:
    """Write ``task.json`` (what ``load_task`` needs to rebuild the task) into ``run_dir``."""
    atomic_write_text(Path(run_dir) / "task.json", json.dumps(task.spec(), indent=2))


def load_task(run_dir: str | os.PathLike, **overrides: Any) -> SyntheticTask | StdlibDocTask:
    """Rebuild the task a run was trained on from its ``task.json`` (and cached ``tokenizer.json``)."""
    path = Path(run_dir) / "task.json"
    if not path.is_file():
        raise DataError(f"expected a task.json in {run_dir} (written by train_seq), found none")
    spec = json.loads(path.read_text())
    name = spec.pop("task")
    spec.pop("name", None)
    spec.update(overrides)
    if name == "stdlib-doc":
        return StdlibDocTask(run_dir=str(run_dir), **spec)
    return SyntheticTask(name, **spec)
