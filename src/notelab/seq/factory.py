"""Build and load the ``notelab.seq`` models at equal size, and read a run's task file.

Equal-size comparison: ``build_model("transformer" | "lstm" | "gru" | "rnn", ...)`` builds the
Transformer at width ``d_model`` (``n_layers`` encoder and decoder layers, d_ff = 4 d_model), and
an RNN encoder-decoder (bidirectional encoder, additive attention) whose hidden size is chosen
so that its parameter count is the closest to the Transformer's (``match_params``). Sizes are
checked against ``notelab.core.limits`` before anything is allocated.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from notelab.core.errors import CheckpointError, DataError, unknown_name
from notelab.core.limits import check_size
from notelab.seq.rnn import RNNSeq2Seq, RNNSeq2SeqConfig
from notelab.seq.transformer import Transformer, TransformerConfig

MODELS = ("transformer", "lstm", "gru", "rnn")


def count_params(model: nn.Module) -> int:
    """Trainable parameters, tied tensors counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())


def _n_params(cls: type, config: Any) -> int:
    """Parameter count of ``cls(config)`` without building its vocabulary-sized tensors.

    The count is affine in the vocabulary size V (embeddings and output layer), so two builds at
    small V give it exactly; building at the real V costs seconds on a loaded CPU. The builds are on
    the meta device (shapes only), so a width too large to allocate is counted, not allocated.
    """
    v0 = max(config.pad_id, config.bos_id, config.eos_id) + 2

    def at(v: int) -> int:
        with torch.device("meta"):
            return count_params(cls(dataclasses.replace(config, src_vocab=v, tgt_vocab=v, max_len=8)))

    n0, n1 = at(v0), at(v0 + 1)
    return n0 + (n1 - n0) * (config.src_vocab - v0)


def model_config(
    model_name: str,
    vocab: int,
    max_len: int,
    *,
    d_model: int = 128,
    n_layers: int = 2,
    n_heads: int = 4,
    dropout: float = 0.1,
    attention: str = "additive",
    match_params: bool = True,
    pad_id: int = 0,
    bos_id: int = 1,
    eos_id: int = 2,
) -> TransformerConfig | RNNSeq2SeqConfig:
    """The config of ``model_name``; RNNs sized to the Transformer's parameter count when ``match_params``."""
    if model_name not in MODELS:
        raise unknown_name("model", model_name, MODELS)
    ids = {"pad_id": pad_id, "bos_id": bos_id, "eos_id": eos_id}
    tcfg = TransformerConfig(
        src_vocab=vocab,
        tgt_vocab=vocab,
        d_model=d_model,
        n_heads=n_heads,
        n_layers_enc=n_layers,
        n_layers_dec=n_layers,
        d_ff=4 * d_model,
        dropout=dropout,
        max_len=max_len,
        **ids,
    )
    if model_name == "transformer":
        return tcfg

    def rnn_cfg(h: int) -> RNNSeq2SeqConfig:
        return RNNSeq2SeqConfig(
            src_vocab=vocab,
            tgt_vocab=vocab,
            cell=model_name,
            d_embed=h,
            d_hidden=h,
            n_layers=n_layers,
            attention=attention,
            d_attn=h,
            dropout=dropout,
            max_len=max_len,
            **ids,
        )

    if not match_params:
        return rnn_cfg(d_model)
    target = _n_params(Transformer, tcfg)
    # Every weight's shape is a product of two of (h, V, constants), so the count is an exact
    # quadratic in the width h: three small builds give it, and its root gives the matched width.
    hs = (8, 16, 24)
    p0, p1, p2 = (_n_params(RNNSeq2Seq, rnn_cfg(h)) for h in hs)
    a = (p2 - 2 * p1 + p0) / (2 * 8**2)
    b = (p1 - p0) / 8 - a * (hs[0] + hs[1])
    c = p0 - a * hs[0] ** 2 - b * hs[0]
    root = (-b + math.sqrt(max(b * b - 4 * a * (c - target), 0.0))) / (2 * a)
    best = min({max(1, math.floor(root)), max(1, math.ceil(root))}, key=lambda h: abs(a * h * h + b * h + c - target))
    return rnn_cfg(best)


def check_model_size(config: TransformerConfig | RNNSeq2SeqConfig, allow_large: bool | None = None) -> int:
    """The parameter count of the model of ``config``, or a one-line :class:`ConfigError` when it is
    above ``notelab.core.limits``' size bound (``allow_large`` None: the enclosing
    ``allow_large_models``, which ``--allow-large`` sets); nothing is allocated."""
    cls = Transformer if isinstance(config, TransformerConfig) else RNNSeq2Seq
    return check_size(config, model_cls=cls, allow_large=allow_large)


def build_model(model_name: str, vocab: int, max_len: int, **kw: Any) -> nn.Module:
    """``Transformer`` or ``RNNSeq2Seq`` for ``model_name`` (see ``model_config``), size-checked first."""
    config = model_config(model_name, vocab, max_len, **kw)
    check_model_size(config)
    return Transformer(config) if isinstance(config, TransformerConfig) else RNNSeq2Seq(config)


def model_name_of(model: nn.Module) -> str:
    return "transformer" if isinstance(model, Transformer) else model.config.cell


def load_model(run_dir: str | Path, device: str | torch.device = "cpu", allow_large: bool = False) -> nn.Module:
    """The model saved in a run directory by ``train_seq`` (either kind, read from config.json);
    ``allow_large`` lifts the size bound checked before allocation (``notelab.core.limits``)."""
    from notelab.core.config import load_json

    path = Path(run_dir)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"expected a run directory with config.json at {path}, found none")
    kind = load_json(path / "config.json").get("model_type")
    classes = {"transformer": Transformer, "rnn_seq2seq": RNNSeq2Seq}
    if kind not in classes:
        raise CheckpointError(
            f"{path / 'config.json'}: expected model_type 'transformer' or 'rnn_seq2seq', got {kind!r}"
        )
    return classes[kind].from_pretrained(path, device=device, allow_large=allow_large)


# task.json, field by field: the fields each kind of task writes (``spec()``) and the types they take.
_INT, _OPT_INT = (int,), (int, type(None))
TASK_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "synthetic": {"task": (str,), "name": (str,), "length": _INT, "batch_size": _INT, "n_symbols": _INT},
    "stdlib-doc": {
        "task": (str,),
        "vocab_size": _INT,
        "max_src_len": _INT,
        "max_tgt_len": _INT,
        "batch_size": _INT,
        "max_train": _OPT_INT,
        "max_test": _OPT_INT,
    },
}


def check_task_file(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``task.json``, checked field by field (names, types, positive integers) before it is used."""
    from notelab.core.config import load_json
    from notelab.seq.tasks import SYNTHETIC_TASKS

    path = Path(run_dir) / "task.json"
    if not path.is_file():
        raise DataError(f"expected a task.json in {run_dir} (written by train_seq), found none")
    spec = load_json(path)
    name = spec.get("task")
    if name not in (*SYNTHETIC_TASKS, "stdlib-doc"):
        raise DataError(f"{path}: task: expected one of {', '.join((*SYNTHETIC_TASKS, 'stdlib-doc'))}, got {name!r}")
    fields = TASK_FIELDS["stdlib-doc" if name == "stdlib-doc" else "synthetic"]
    unknown = sorted(set(spec) - set(fields))
    if unknown:
        raise DataError(f"{path}: unknown field(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    for key, value in spec.items():
        types = fields[key]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise DataError(f"{path}: {key}: expected {wanted}, got {value!r}")
        if isinstance(value, int) and value < 1:
            raise DataError(f"{path}: {key}: expected a positive integer, got {value!r}")
    if "name" in spec and spec["name"] != name:
        raise DataError(f"{path}: name: expected {name!r} (the task), got {spec['name']!r}")
    return spec
