"""Train, evaluate and use ``notelab.seq`` models on a task: the glue the CLI and the claim share.

Training goes through ``notelab.train.fit`` with label-smoothed cross entropy (Szegedy et al.
2016; eps = 0.1 as in Vaswani et al. 2017, sec. 5.4) and, for the Transformer, the warmup /
inverse-square-root "Noam" schedule (eq. 3, normalised so that ``TrainConfig.lr`` is its peak).
``time_budget`` stops training after that many wall-clock seconds (a callback raises, the model
trained so far is kept): "equal training time" rather than equal steps.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from notelab.core.errors import ConfigError, DataError, ShapeError
from notelab.core.runtime import get_device, seed_everything
from notelab.seq.decoding import generate
from notelab.seq.factory import build_model, check_task_file, count_params, load_model
from notelab.seq.losses import noam_schedule, seq2seq_loss
from notelab.seq.tasks import (
    StdlibDocTask,
    SyntheticTask,
    corpus_bleu,
    exact_match,
    load_task,
    save_task,
    sequence_accuracy,
)


class _TimeUp(Exception):
    """Raised by the time-budget callback to end ``fit`` early."""


@dataclass
class SeqRun:
    model: nn.Module
    task: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0
    params: int = 0


def train_seq(
    model_name: str,
    task: SyntheticTask | StdlibDocTask,
    out_dir: str | Path | None = None,
    train_config: Any = None,
    *,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    dropout: float = 0.1,
    label_smoothing: float = 0.1,
    warmup: int | None = None,
    time_budget: float | None = None,
    max_len: int | None = None,
    attention: str = "additive",
) -> SeqRun:
    """Build ``model_name`` for ``task``, train it with ``fit``, save model + task (+ tokenizer) in ``out_dir``.

    ``warmup``: Noam warmup steps for the Transformer (default ``train_config.warmup_steps`` or
    10% of the steps). ``max_len`` defaults to the task's longest side.
    """
    from notelab.train import TrainConfig, fit

    config = train_config if train_config is not None else TrainConfig(steps=500, batch_size=task.batch_size)
    if time_budget is not None and not time_budget > 0:
        raise ConfigError(f"time_budget: expected a positive number of seconds, got {time_budget!r}")
    max_len = max_len or max(task.src_len, task.tgt_len)
    if max_len < max(task.src_len, task.tgt_len):
        raise ConfigError(
            f"max_len: expected at least the task's length {max(task.src_len, task.tgt_len)}, got {max_len}"
        )
    seed_everything(config.seed)  # the initial weights are the run's: same seed, same model
    model = build_model(
        model_name,
        task.vocab,
        max_len,
        d_model=d_model,
        n_layers=n_layers,
        n_heads=n_heads,
        dropout=dropout,
        attention=attention,
        pad_id=task.pad_id,
        bos_id=task.bos_id,
        eos_id=task.eos_id,
    )
    if out_dir is not None:
        config = dataclasses.replace(config, out_dir=str(out_dir))
    lr_fn = None
    if model_name == "transformer":
        lr_fn = noam_schedule(warmup or config.warmup_steps or max(1, config.steps // 10))

    history: list[dict[str, Any]] = []
    t0 = time.perf_counter()

    def on_step(step: int, logs: dict[str, Any]) -> None:
        history.append({"step": step, **logs, "seconds": time.perf_counter() - t0})
        if time_budget is not None and time.perf_counter() - t0 > time_budget:
            raise _TimeUp

    def loss_fn(m: nn.Module, batch: Any, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = seq2seq_loss(m, batch, generator, eps=label_smoothing)
        metrics["tokens"] = float((batch[2] != task.pad_id).sum())
        return loss, metrics

    try:
        fit(model, loss_fn, task, config, lr_fn=lr_fn, callbacks=[on_step])
    except _TimeUp:
        pass
    model.eval()
    seconds = time.perf_counter() - t0
    if out_dir is not None:
        model.save_pretrained(out_dir)
        save_task(task, out_dir)
        if isinstance(task, StdlibDocTask) and task.run_dir != str(out_dir):
            task.tokenizer.save(Path(out_dir) / "tokenizer.json")
    return SeqRun(model, task, history, len(history), seconds, count_params(model))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    task: SyntheticTask | StdlibDocTask,
    *,
    n_examples: int = 512,
    beam_size: int = 1,
    seed: int = 12345,
    batch_size: int = 128,
) -> dict[str, float]:
    """Decode held-out examples and score them.

    Synthetic tasks: ``n_examples`` fresh examples from a generator seeded with ``seed`` (training
    draws from fit's streams, so these are unseen in practice); returns ``exact_match`` and
    ``token_acc``. stdlib-doc: the test split; returns ``bleu`` and ``exact_match``.
    """
    model.eval()
    device = next(model.parameters()).device
    if isinstance(task, StdlibDocTask):
        hyps, refs = [], []
        for src, references in task.test_batches(batch_size):
            out = generate(model, src.to(device), beam_size, task.tgt_len)
            hyps += [task.decode_output(row.tolist()) for row in out.cpu()]
            refs += references
        return {"bleu": corpus_bleu(hyps, refs), "exact_match": exact_match(hyps, refs), "n": float(len(refs))}
    g = torch.Generator().manual_seed(seed)
    exact = tok = 0.0
    done = 0
    while done < n_examples:
        b = min(batch_size, n_examples - done)
        src, _, tgt_out = task.sample(b, g)
        pred = generate(model, src.to(device), beam_size, task.tgt_len).cpu()
        e, t = sequence_accuracy(pred, tgt_out, task.pad_id)
        exact, tok, done = exact + e * b, tok + t * b, done + b
    return {"exact_match": exact / done, "token_acc": tok / done, "n": float(done)}


def translate(
    run_dir: str | Path, text: str, *, beam_size: int = 1, device: str = "cpu", allow_large: bool = False
) -> str:
    """Decode one input with a trained run: Python source -> summary, or space-separated ids -> ids
    (``allow_large``: load a model above the size bound, as :func:`load_model`)."""
    if beam_size < 1:
        raise ConfigError(f"beam: expected a beam size >= 1, got {beam_size}")
    if not text.strip():
        raise ShapeError("input: expected a non-empty sequence, got an empty string")
    check_task_file(run_dir)
    model = load_model(run_dir, device=get_device(device), allow_large=allow_large)
    task = load_task(run_dir)
    src = task.encode_input(text)
    if src.shape[1] > model.config.max_len:
        raise ShapeError(f"input: {src.shape[1]} tokens is beyond the model's max_len {model.config.max_len}")
    if src.shape[1] == 0:
        raise DataError("input: the tokenizer produced no tokens")
    max_out = min(task.tgt_len if isinstance(task, StdlibDocTask) else src.shape[1] + 1, model.config.max_len)
    out = generate(model, src.to(next(model.parameters()).device), beam_size, max_out)
    return task.decode_output(out[0].tolist())
