"""Train, evaluate and probe ``notelab.seq`` models on a task: the glue the CLI and the claim share.

Equal-size comparison: ``build_model("transformer" | "lstm" | "gru" | "rnn", ...)`` builds the
Transformer at width ``d_model`` (``n_layers`` encoder and decoder layers, d_ff = 4 d_model), and
an RNN encoder-decoder (bidirectional encoder, additive attention) whose hidden size is chosen
so that its parameter count is the closest to the Transformer's (``match_params``).

Training goes through ``notelab.train.fit`` with label-smoothed cross entropy (Szegedy et al.
2016; eps = 0.1 as in Vaswani et al. 2017, sec. 5.4) and, for the Transformer, the warmup /
inverse-square-root "Noam" schedule (eq. 3, normalised so that ``TrainConfig.lr`` is its peak).
``time_budget`` stops training after that many wall-clock seconds (a callback raises, the model
trained so far is kept): "equal training time" rather than equal steps.

Probes:

- ``train_throughput``: training tokens per second (forward + backward, source plus target
  tokens) of several models at one sequence length, timed interleaved (best of N).
- ``input_gradient_norms``: ||d f / d x_t|| for the source embeddings x_t, where f = w . h_L is a
  fixed random projection of the encoder's state at the last source position (for the RNNs the
  forward direction's annotation, i.e. the recurrent path; for the Transformer the last encoder
  output). Against the distance L - 1 - t this is the vanishing-gradient picture of Bengio et al.
  (1994) and Pascanu et al. (2013, eq. 5): a product of t Jacobians for a recurrence, one
  attention step for the Transformer.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from notelab.core.errors import CheckpointError, ConfigError, DataError, ShapeError, unknown_name
from notelab.core.limits import check_size
from notelab.core.runtime import autocast, autocast_dtype, get_device, seed_everything
from notelab.seq.decoding import generate
from notelab.seq.losses import noam_schedule, seq2seq_loss
from notelab.seq.rnn import RNNSeq2Seq, RNNSeq2SeqConfig
from notelab.seq.tasks import (
    StdlibDocTask,
    SyntheticTask,
    corpus_bleu,
    exact_match,
    load_task,
    save_task,
    sequence_accuracy,
)
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


# ------------------------------------------------------------------------------------------ probes


def make_train_step(
    model: nn.Module,
    length: int,
    batch_size: int,
    *,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    seed: int = 0,
    compile: bool = False,
) -> Callable[[], None]:
    """A closure running one forward + backward of the cross entropy on a random ``(batch, length)`` pair.

    Source and target both have ``length`` tokens; gradients are dropped after each call (no
    optimizer step: the optimizer's cost does not depend on the architecture's recurrence).
    """
    device = torch.device(device)
    model = model.to(device).train()
    c = model.config
    g = torch.Generator().manual_seed(seed)
    lo = max(c.pad_id, c.bos_id, c.eos_id) + 1
    src = torch.randint(lo, c.src_vocab, (batch_size, length), generator=g).to(device)
    tgt = torch.randint(lo, c.tgt_vocab, (batch_size, length), generator=g).to(device)
    dtype = autocast_dtype(device, precision)
    fwd = torch.compile(model) if compile else model

    def step() -> None:
        with autocast(device, dtype):
            logits = fwd(src, tgt)
        loss = nn.functional.cross_entropy(logits.float().flatten(0, 1), tgt.flatten())
        loss.backward()
        model.zero_grad(set_to_none=True)

    return step


def best_times(
    fns: dict[str, Callable[[], None]], repeats: int, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Best wall time of each function over ``repeats`` interleaved rounds (load bursts hit all alike)."""
    device = torch.device(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[name].append(time.perf_counter() - t0)
    return {k: min(v) for k, v in times.items()}


def train_throughput(
    models: dict[str, nn.Module],
    length: int,
    batch_size: int,
    *,
    repeats: int = 3,
    warmup: int = 1,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    seed: int = 0,
    compile: bool = False,
) -> dict[str, float]:
    """Training tokens/s of each model at ``length`` (forward + backward; source + target tokens).

    The models run interleaved, best of ``repeats`` after ``warmup`` rounds, so that they are
    compared under the same load: the ratios are the measurement, more than the absolute rates.
    """
    steps = {
        name: make_train_step(m, length, batch_size, device=device, precision=precision, seed=seed, compile=compile)
        for name, m in models.items()
    }
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    best = best_times(steps, repeats, device)
    return {name: 2 * batch_size * length / t for name, t in best.items()}


def input_gradient_norms(
    model: nn.Module, length: int, *, batch_size: int = 16, n_probes: int = 4, seed: int = 0
) -> torch.Tensor:
    """``(length,)`` mean ||d f / d x_t||, index = distance from the output (0 = last position).

    f = w . h_L for ``n_probes`` random unit vectors w (see the module docstring); dropout off.
    """
    was_training = model.training
    model.eval()
    c = model.config
    device = next(model.parameters()).device
    g = torch.Generator().manual_seed(seed)
    lo = max(c.pad_id, c.bos_id, c.eos_id) + 1
    src = torch.randint(lo, c.src_vocab, (batch_size, length), generator=g).to(device)
    captured: list[torch.Tensor] = []

    def hook(_module: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        out.retain_grad()
        captured.append(out)

    handle = model.src_embed.register_forward_hook(hook)
    try:
        memory = model.encode(src)
    finally:
        handle.remove()
    if isinstance(model, Transformer):
        last = memory[:, -1]
    else:
        last = memory.states[:, -1, : model.config.d_hidden]  # the forward direction
    x = captured[0]
    norms = torch.zeros(length, device=device)
    for _ in range(n_probes):
        w = torch.randn(last.shape[-1], generator=g).to(device)
        w = w / w.norm()
        (grad,) = torch.autograd.grad((last @ w).sum(), x, retain_graph=True)
        norms += grad.norm(dim=-1).mean(0)
    model.train(was_training)
    return (norms / n_probes).flip(0).detach().cpu()


def decay_rate(norms: torch.Tensor, max_distance: int | None = None) -> float:
    """Least-squares slope of log10 ||grad|| against distance (per step; more negative = faster vanishing).

    Fitted up to the first norm that underflowed to 0 (float32 runs out near 1e-38-1e-45).
    """
    y = norms[:max_distance].double()
    zero = (y <= 0).nonzero()
    y = y[: int(zero[0]) if len(zero) else len(y)].log10()
    t = torch.arange(len(y), dtype=torch.float64)
    t, y = t - t.mean(), y - y.mean()
    return float((t * y).sum() / (t * t).sum()) if len(y) > 1 else math.nan
