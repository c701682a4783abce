"""Pre-training a Llama on text by next-token prediction, and perplexity.

The objective (LLaMA, Touvron et al. 2023, sec. 2; Radford et al. 2018, eq. 1) over a window
``x_0 .. x_T`` of the packed token stream (:class:`notelab.lm.data.PackedStream`)::

    L = -(1/T) sum_{t=1..T} log p_theta(x_t | x_<t)

and perplexity on held-out text is ``exp`` of the same mean over non-overlapping windows
(every held-out token after the first is predicted exactly once, from at most ``T`` tokens of
context)::

    PPL = exp( -(1/N) sum_i log p_theta(x_i | x_{start(i)} .. x_{i-1}) )

Run directory written by :func:`pretrain`: ``config.json`` + ``model.safetensors`` (the model),
``tokenizer.json``, ``data.json`` (where the text came from and how it was cut, for ``notelab lm
eval`` and resuming), plus ``fit``'s ``checkpoint/`` and ``log.jsonl``. Everything a resume needs
(``config.json``, ``tokenizer.json``, ``data.json``) is written before the first step, and a
resumed run is checked against it (:func:`check_resume`).
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

from notelab.core.checkpoint import CONFIG_NAME, PretrainedMixin
from notelab.core.config import config_to_dict, load_json, save_config
from notelab.core.errors import ConfigError
from notelab.core.io import atomic_write_text
from notelab.core.runtime import autocast, autocast_dtype, seed_everything
from notelab.data.tokenizer import Tokenizer
from notelab.lm.config import LlamaConfig
from notelab.lm.data import PackedStream, encode_stream, eval_windows, text_splits, train_tokenizer
from notelab.lm.loss import linear_cross_entropy
from notelab.lm.model import Llama
from notelab.train import FitResult, TrainConfig, fit, unwrap_model

DATA_NAME = "data.json"
# data.json: field -> (types allowed, required). "data" names the text; the rest say how it was cut.
DATA_FIELDS: dict[str, tuple[tuple[type, ...], bool]] = {
    "data": ((str,), True),
    "max_chars": ((int, type(None)), False),  # training characters kept (None: all)
    "vocab_size": ((int, type(None)), False),  # BPE vocabulary asked for when the tokenizer was trained
    "seq_len": ((int,), False),  # training window
}


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
    source = {"data": str(data), "max_chars": max_chars, "vocab_size": vocab_size}
    result = LMData(tokenizer, encode_stream(tokenizer, train_texts), encode_stream(tokenizer, val_texts), source)
    if out_dir is not None:
        save_data_info(result, out_dir)
    return result


def save_data_info(data: LMData, out_dir: str | os.PathLike, **extra: Any) -> None:
    """Write ``tokenizer.json`` and ``data.json`` (``data.source`` plus ``extra``) into a run directory."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data.tokenizer.save(out_dir)
    atomic_write_text(out_dir / DATA_NAME, json.dumps({**data.source, **extra}) + "\n")


def next_token_loss(
    model: nn.Module, batch: torch.Tensor, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy of ``batch[:, 1:]`` given ``batch[:, :-1]`` (a ``(B, T + 1)`` window batch).

    A model whose ``lm_head`` is a plain bias-free ``nn.Linear`` and which returns its final hidden
    states (``model(x, return_hidden=True)``, :class:`notelab.lm.Llama`) gets the chunked loss of
    :func:`notelab.lm.loss.linear_cross_entropy`, which never holds the ``(B, T, V)`` float32
    logits (its per-chunk softmax compiled too when the model is, as ``fit`` does on CUDA); any
    other model (e.g. a LoRA-wrapped head) gets ``F.cross_entropy`` on its logits.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    head = getattr(unwrap_model(model), "lm_head", None)
    if type(head) is nn.Linear and head.bias is None:
        compiled = isinstance(getattr(model, "_orig_mod", None), nn.Module)  # fit's torch.compile wrapper
        hidden = model(inputs, return_hidden=True)
        loss = linear_cross_entropy(hidden, head.weight, targets, compile=compiled)
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
    if out_dir is not None and train_config.resume:
        model_config = getattr(model, "config", None) if model is not None else config
        check_resume(out_dir, {**data.source, "seq_len": seq_len}, data.tokenizer, model_config)
    if model is None:
        seed_everything(train_config.seed)  # the initial weights are the run's: same seed, same model
        model = Llama(config)
    for cb in callbacks:
        if isinstance(cb, ValLoss):
            cb.model = model
    if out_dir is not None and train_config.out_dir is None:
        train_config = dataclasses.replace(train_config, out_dir=str(out_dir))
    if out_dir is not None:  # before the first step: what a resume after a crash must find
        save_data_info(data, out_dir, seq_len=seq_len)
        if isinstance(model, PretrainedMixin):
            save_config(model.config, Path(out_dir) / CONFIG_NAME, model_type=model.model_type)
    stream = PackedStream(data.train, seq_len, train_config.batch_size)
    result = fit(model, next_token_loss, stream, train_config, callbacks=callbacks)
    if out_dir is not None:
        result.model.save_pretrained(out_dir)
    return result


def load_run(
    path: str | os.PathLike, device: str | torch.device = "cpu", allow_large: bool = False
) -> tuple[Llama, Tokenizer]:
    """A run directory (or any Llama checkpoint holding a ``tokenizer.json``) -> (model, tokenizer).

    ``allow_large`` lifts the size bound checked before the model is allocated (``from_pretrained``).
    """
    model = Llama.from_pretrained(path, device=device, allow_large=allow_large)
    tokenizer = Tokenizer.from_file(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ConfigError(
            f"{path}: expected a tokenizer of at most {model.config.vocab_size} tokens (the model's embeddings), "
            f"got {tokenizer.vocab_size}"
        )
    return model, tokenizer


def check_data_info(info: Any, source: str = DATA_NAME) -> dict[str, Any]:
    """``info`` (a parsed ``data.json``) checked field by field; one-line :class:`ConfigError` otherwise."""
    if not isinstance(info, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(info).__name__}")
    unknown = sorted(set(info) - set(DATA_FIELDS))
    if unknown:
        raise ConfigError(f"{source}: unknown field(s) {', '.join(unknown)}; known: {', '.join(DATA_FIELDS)}")
    for name, (types, required) in DATA_FIELDS.items():
        if name not in info:
            if required:
                raise ConfigError(f"{source}: expected a field {name!r}, found none")
            continue
        value = info[name]
        wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
        if isinstance(value, bool) or not isinstance(value, types):
            raise ConfigError(f"{source}: {name}: expected {wanted}, got {value!r}")
        if isinstance(value, int) and value < 1:
            raise ConfigError(f"{source}: {name}: expected a positive integer, got {value!r}")
    return info


def load_data_info(path: str | os.PathLike) -> dict[str, Any]:
    """The checked ``data.json`` of a run directory; ``{"data": "stdlib", "max_chars": None}`` when absent."""
    p = Path(path) / DATA_NAME
    if not p.is_file():
        return {"data": "stdlib", "max_chars": None}
    return check_data_info(load_json(p), str(p))


def check_resume(
    out_dir: str | os.PathLike,
    source: dict[str, Any],
    tokenizer: Tokenizer | None = None,
    model_config: Any = None,
) -> None:
    """A resumed run must read the same text, cut the same way, with the run's tokenizer and model config.

    Compares ``source`` (``data.json``'s fields, e.g. ``{"data", "max_chars", "vocab_size",
    "seq_len"}``) with the run's saved ``data.json``, ``tokenizer`` with its ``tokenizer.json`` and
    ``model_config`` with its ``config.json``; a difference is a one-line :class:`ConfigError`
    naming the saved and the given value. A run with nothing saved yet (killed before its first
    step) passes.
    """
    out_dir = Path(out_dir)
    if (out_dir / DATA_NAME).is_file():
        saved = load_data_info(out_dir)
        for name, given in source.items():
            if name in saved and saved[name] != given:
                raise ConfigError(
                    f"resume: {out_dir / DATA_NAME} has {name} {saved[name]!r}, given {given!r}; "
                    "resume with the run's settings or start a new run"
                )
    tok_path = out_dir / "tokenizer.json"
    if tokenizer is not None and tok_path.is_file():
        if Tokenizer.from_file(tok_path).backend.to_str() != tokenizer.backend.to_str():
            raise ConfigError(f"resume: expected the run's tokenizer ({tok_path}), given a different one")
    if model_config is not None and dataclasses.is_dataclass(model_config) and (out_dir / CONFIG_NAME).is_file():
        saved_cfg = load_json(out_dir / CONFIG_NAME)
        saved_cfg.pop("model_type", None)
        for name, given in config_to_dict(model_config).items():
            if saved_cfg.get(name) != given:
                raise ConfigError(
                    f"resume: {out_dir / CONFIG_NAME} has {name} {saved_cfg.get(name)!r}, given {given!r}"
                )
