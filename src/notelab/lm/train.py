"""Pre-training a Llama on text by next-token prediction, and perplexity.

The objective (LLaMA, Touvron et al. 2023, sec. 2; Radford et al. 2018, eq. 1) over a window
``x_0 .. x_T`` of the packed token stream (:class:`notelab.lm.data.PackedStream`)::

    L = -(1/T) sum_{t=1..T} log p_theta(x_t | x_<t)

and perplexity on held-out text is ``exp`` of the same mean over non-overlapping windows
(every held-out token after the first is predicted exactly once, from at most ``T`` tokens of
context)::

    PPL = exp( -(1/N) sum_i log p_theta(x_i | x_{start(i)} .. x_{i-1}) )

Run directory written by :func:`pretrain`: ``config.json`` + ``model.safetensors`` (the model),
``tokenizer.json``, ``data.json`` (where the text came from, for ``notelab lm eval``), plus
``fit``'s ``checkpoint/`` and ``log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from notelab.core.errors import ConfigError
from notelab.core.io import atomic_write_text
from notelab.core.runtime import autocast, autocast_dtype
from notelab.data.tokenizer import Tokenizer
from notelab.lm.config import LlamaConfig
from notelab.lm.data import PackedStream, encode_stream, eval_windows, text_splits, train_tokenizer
from notelab.lm.loss import linear_cross_entropy
from notelab.lm.model import Llama
from notelab.train import FitResult, TrainConfig, fit, unwrap_model

DATA_NAME = "data.json"


@dataclass
class LMData:
    tokenizer: Tokenizer
    train: torch.Tensor  # (N,) int32 token stream
    val: torch.Tensor  # (M,) held-out stream (other files)
    source: dict[str, Any]  # where the text came from: {"data": ..., "max_chars": ...}


def prepare_data(
    data: str | os.PathLike = "stdlib",
    vocab_size: int = 4096,
    max_chars: int | None = None,
    tokenizer: Tokenizer | None = None,
    out_dir: str | os.PathLike | None = None,
) -> LMData:
    """Text -> (BPE tokenizer trained on the train split, train stream, val stream).

    Given ``tokenizer`` is reused (e.g. a run's ``tokenizer.json``); otherwise one is trained and,
    with ``out_dir``, saved there as ``tokenizer.json`` with ``data.json``.
    """
    train_texts, val_texts = text_splits(data, max_chars)
    tokenizer = tokenizer if tokenizer is not None else train_tokenizer(train_texts, vocab_size)
    source = {"data": str(data), "max_chars": max_chars}
    result = LMData(tokenizer, encode_stream(tokenizer, train_texts), encode_stream(tokenizer, val_texts), source)
    if out_dir is not None:
        save_data_info(result, out_dir)
    return result


def save_data_info(data: LMData, out_dir: str | os.PathLike) -> None:
    """Write ``tokenizer.json`` and ``data.json`` into a run directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.tokenizer.save(out_dir)
    atomic_write_text(out_dir / DATA_NAME, json.dumps(data.source) + "\n")


def next_token_loss(
    model: nn.Module, batch: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy of ``batch[:, 1:]`` given ``batch[:, :-1]`` (a ``(B, T + 1)`` window batch).

    A model whose ``lm_head`` is a plain bias-free ``nn.Linear`` and which returns its final hidden
    states (``model(x, return_hidden=True)``, :class:`notelab.lm.Llama`) gets the chunked loss of
    :func:`notelab.lm.loss.linear_cross_entropy`, which never holds the ``(B, T, V)`` float32
    logits; any other model (e.g. a LoRA-wrapped head) gets ``F.cross_entropy`` on its logits.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    head = getattr(unwrap_model(model), "lm_head", None)
    if type(head) is nn.Linear and head.bias is None:
        loss = linear_cross_entropy(model(inputs, return_hidden=True), head.weight, targets)
    else:
        logits = model(inputs)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))
    return loss, {"tokens": float(targets.numel())}


@torch.no_grad()
def mean_nll(
    model: nn.Module,
    tokens: torch.Tensor,
    seq_len: int,
    batch_size: int = 8,
    max_windows: int | None = None,
    precision: str = "auto",
) -> float:
    """Mean negative log-likelihood (nats / token) over non-overlapping windows of ``seq_len``."""
    device = next(model.parameters()).device
    amp = autocast_dtype(device, precision)
    windows = eval_windows(tokens, seq_len, max_windows)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(windows), batch_size):
        w = windows[start : start + batch_size].to(device)
        with autocast(device, amp):
            logits = model(w[:, :-1])
        nll = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), w[:, 1:].reshape(-1), reduction="sum")
        total, count = total + nll.item(), count + w[:, 1:].numel()
    model.train(was_training)
    return total / count


@torch.no_grad()
def nll_by_position(
    model: nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 8, max_windows: int | None = None
) -> torch.Tensor:
    """``(seq_len,)`` mean NLL of the target at each position of the window (position t sees t+1 tokens)."""
    device = next(model.parameters()).device
    amp = autocast_dtype(device, "auto")
    windows = eval_windows(tokens, seq_len, max_windows)
    was_training = model.training
    model.eval()
    total = torch.zeros(seq_len, dtype=torch.float64)
    for start in range(0, len(windows), batch_size):
        w = windows[start : start + batch_size].to(device)
        with autocast(device, amp):
            logits = model(w[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), w[:, 1:], reduction="none")  # (B, T)
        total += nll.sum(0).double().cpu()
    model.train(was_training)
    return (total / len(windows)).float()


def perplexity(
    model: nn.Module, tokens: torch.Tensor, seq_len: int, batch_size: int = 8, max_windows: int | None = None
) -> float:
    """``exp(mean NLL)`` over non-overlapping windows (module docstring)."""
    return math.exp(mean_nll(model, tokens, seq_len, batch_size, max_windows))


class ValLoss:
    """``fit`` callback: held-out mean NLL every ``every`` steps, kept in ``self.curve`` as (step, loss)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int, every: int, max_windows: int = 16, batch_size: int = 8):
        self.tokens, self.seq_len, self.every = tokens, seq_len, every
        self.max_windows, self.batch_size = max_windows, batch_size
        self.curve: list[tuple[int, float]] = []
        self.model: nn.Module | None = None

    def __call__(self, step: int, logs: dict[str, Any]) -> None:
        if self.model is not None and (step % self.every == 0 or step == 1):
            self.curve.append(
                (step, mean_nll(self.model, self.tokens, self.seq_len, self.batch_size, self.max_windows))
            )


def pretrain(
    config: LlamaConfig,
    data: LMData,
    out_dir: str | os.PathLike | None,
    train_config: TrainConfig,
    seq_len: int | None = None,
    callbacks: Sequence[Callable[[int, dict[str, Any]], None]] = (),
    model: nn.Module | None = None,
) -> FitResult:
    """Train ``Llama(config)`` (or ``model``) on ``data.train`` with :func:`notelab.train.fit`.

    With ``out_dir`` the run directory gets the model, the tokenizer and ``data.json`` (module
    docstring); ``train_config.out_dir`` defaults to it, so checkpoints and logs land there too.
    ``ValLoss`` callbacks are pointed at the model being trained.
    """
    seq_len = seq_len or config.max_seq_len
    if seq_len > config.max_seq_len:
        raise ConfigError(f"seq_len: expected at most the model's max_seq_len {config.max_seq_len}, got {seq_len}")
    if data.tokenizer.vocab_size > config.vocab_size:
        raise ConfigError(
            f"vocab_size: expected at least the tokenizer's {data.tokenizer.vocab_size} tokens, "
            f"the model has {config.vocab_size} embeddings"
        )
    model = model if model is not None else Llama(config)
    for cb in callbacks:
        if isinstance(cb, ValLoss):
            cb.model = model
    if out_dir is not None and train_config.out_dir is None:
        train_config = dataclasses.replace(train_config, out_dir=str(out_dir))
    stream = PackedStream(data.train, seq_len, train_config.batch_size)
    result = fit(model, next_token_loss, stream, train_config, callbacks=callbacks)
    if out_dir is not None:
        result.model.save_pretrained(out_dir)
        save_data_info(data, out_dir)
    return result


def load_run(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[Llama, Tokenizer]:
    """A run directory (or any Llama checkpoint holding a ``tokenizer.json``) -> (model, tokenizer)."""
    model = Llama.from_pretrained(path, device=device)
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"{path}: expected a tokenizer of at most {model.config.vocab_size} tokens (the model's embeddings), "
            f"got {tokenizer.vocab_size}"
        )
    return model, tokenizer


def load_data_info(path: str | os.PathLike) -> dict[str, Any]:
    """The ``data.json`` of a run directory; ``{"data": "stdlib"}`` when absent."""
    p = Path(path) / DATA_NAME
    return json.loads(p.read_text()) if p.is_file() else {"data": "stdlib", "max_chars": None}
