"""Claim: the Transformer replaces recurrence with attention, so it trains in parallel over time and
does not suffer from gradients vanishing with distance, as RNNs do (LSTM / GRU only soften it).

Vaswani et al. 2017, "Attention Is All You Need", sec. 1 and 4 (Table 1: O(1) sequential
operations and path length for self-attention against O(n) for a recurrent layer); Bengio et al.
1994 and Pascanu et al. 2013 (eq. 5) for vanishing gradients in RNNs; Hochreiter & Schmidhuber
1997 for the LSTM and the adding problem.

Four measurements, each model an encoder-decoder of ``notelab.seq`` at (about) equal parameter
count (RNN width solved for to match the Transformer's; the counts are in the tables):

1. Training throughput (forward + backward tokens/s) against sequence length, Transformer vs
   LSTM vs GRU, in one run, at a fixed number of tokens per batch, on the CPU and, when there is
   one, on the GPU (with a larger model there, one that fills the card); the RNNs use Luong's
   bilinear attention here (fused SDPA kernel), since additive attention's (T, S, d) score tensor
   would measure memory traffic rather than recurrence.
2. Accuracy (sequence exact match) against dependency length L on copy / reverse / adding at a
   fixed training budget, for RNN, LSTM, GRU and the Transformer.
3. ||d f / d x_t|| for a fixed projection f of the encoder's last state against the distance
   L - 1 - t, at initialisation and after the copy training of (2) (log scale).
4. stdlib code summarisation (source -> first docstring sentence): BLEU and exact match of each
   model after the same wall-clock training time.

Measurement 1 uses every CPU thread; 2-4 train small models on one thread (on CPU), which is
faster for them than two threads on a shared machine. On a GPU the full run trains longer (the
``FULL_GPU`` settings) and runs the trainings of (2) in several processes at once: models this
small leave the card mostly idle.

The claim holds when the Transformer's throughput relative to both LSTM and GRU is higher at the
longest length than at the shortest (the parallelism claim: judged on the GPU when there is one,
since parallel hardware is what it is about, and reported for the CPU either way) and the vanilla
RNN's gradient norm decays fastest with distance at initialisation (the vanishing-gradient
claim). Accuracy and BLEU are reported, not judged: at a fixed budget they say where a model
starts to fail, not how far each would go.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from notelab.core.runtime import seed_everything
from notelab.reproduce.base import ClaimResult, Figure, Table
from notelab.seq.experiments import (
    MODELS,
    build_model,
    count_params,
    decay_rate,
    evaluate,
    input_gradient_norms,
    train_seq,
    train_throughput,
)
from notelab.seq.tasks import SYNTH_VOCAB_SIZE, StdlibDocTask, SyntheticTask
from notelab.train import TrainConfig

NAME = "transformer-vs-rnn"
TITLE = "Transformer vs RNN / LSTM / GRU: parallel training and no vanishing gradients"
CLAIM = (
    "RNNs process tokens one after another, so training cannot be parallel over time, and signals "
    "over long distances vanish; LSTM and GRU soften the gradient problem but keep the sequential "
    "bottleneck. The Transformer drops recurrence for attention: every position sees every other in "
    "one parallel step."
)
THROUGHPUT_MODELS = ("transformer", "lstm", "gru")


@dataclass
class Settings:
    d_model: int  # Transformer width; RNNs matched in parameters
    n_layers: int  # encoder and decoder layers
    throughput_lengths: tuple[int, ...]
    throughput_cpu: tuple[int, int, int]  # (d_model, layers, batch * length per step) of the CPU measurement
    throughput_gpu: tuple[int, int, int]  # the same on a GPU, when there is one
    throughput_repeats: int  # best of this many interleaved rounds
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]  # dependency lengths L of the synthetic tasks
    task_steps: int  # training steps per (task, L, model)
    task_batch: int
    task_lr: float
    eval_examples: int
    grad_length: int  # source length of the gradient probe at init
    doc_seconds: float  # wall-clock training budget per model on stdlib-doc
    doc_vocab: int
    doc_max_train: int | None
    doc_max_test: int
    doc_src_len: int
    doc_tgt_len: int
    doc_batch: int = 32
    doc_lr: float = 2e-3
    doc_d_model: int | None = None  # None: d_model
    workers: int = 1  # processes training the models of (2) at once (on a GPU)


FULL = Settings(
    d_model=64,
    n_layers=2,
    throughput_lengths=(32, 64, 128, 256, 512, 1024),
    throughput_cpu=(64, 2, 4096),
    throughput_gpu=(512, 6, 65536),  # sized for a data-centre card (run on an H200); smaller cards: --quick
    throughput_repeats=2,
    tasks=("copy", "reverse", "adding"),
    lengths=(8, 16, 32, 64),
    task_steps=300,
    task_batch=32,
    task_lr=3e-3,
    eval_examples=256,
    grad_length=128,
    doc_seconds=60.0,
    doc_vocab=2048,
    doc_max_train=None,
    doc_max_test=300,
    doc_src_len=192,
    doc_tgt_len=32,
)
QUICK = Settings(
    d_model=32,
    n_layers=1,
    throughput_lengths=(32, 128, 512),
    throughput_cpu=(32, 1, 1024),
    throughput_gpu=(256, 2, 16384),
    throughput_repeats=2,
    tasks=("copy", "reverse", "adding"),
    lengths=(8, 16),
    task_steps=100,
    task_batch=32,
    task_lr=5e-3,
    eval_examples=64,
    grad_length=64,
    doc_seconds=8.0,
    doc_vocab=1024,
    doc_max_train=1500,
    doc_max_test=60,
    doc_src_len=128,
    doc_tgt_len=24,
)
# The full run on a GPU: the same models trained for 1,000 steps of 128 examples (CPU: 300 of 32), up to
# L = 128, and a wider model on stdlib-doc, where a GPU takes thousands of steps in under a minute.
FULL_GPU = dataclasses.replace(
    FULL,
    lengths=(8, 16, 32, 64, 128),
    task_steps=1000,
    task_batch=128,
    doc_seconds=45.0,
    doc_d_model=256,
    doc_batch=64,
    doc_lr=1e-3,
    workers=8,
)
# For tests: every code path, seconds of compute, meaningless numbers.
TINY = Settings(
    d_model=16,
    n_layers=1,
    throughput_lengths=(8, 16),
    throughput_cpu=(16, 1, 64),
    throughput_gpu=(16, 1, 64),
    throughput_repeats=1,
    tasks=("copy", "adding"),
    lengths=(4,),
    task_steps=3,
    task_batch=8,
    task_lr=3e-3,
    eval_examples=8,
    grad_length=8,
    doc_seconds=0.5,
    doc_vocab=300,
    doc_max_train=150,
    doc_max_test=8,
    doc_src_len=32,
    doc_tgt_len=8,
    doc_batch=8,
)


def _train_config(steps: int, batch: int, lr: float, seed: int, constant: bool = False) -> TrainConfig:
    return TrainConfig(
        steps=steps,
        batch_size=batch,
        lr=lr,
        warmup_steps=max(1, steps // 10) if not constant else 20,
        schedule="constant" if constant else "cosine",
        min_lr_ratio=0.1,
        progress=False,
        log_every=max(1, steps),
        device="cpu" if not torch.cuda.is_available() else "auto",
        seed=seed,
    )


@dataclass
class Section:
    """What one measurement adds to the report, and the numbers the verdict reads."""

    tables: list[Table]
    figures: list[Figure]
    values: dict[str, Any]


def throughput_section(s: Settings, seed: int, out_dir: Path) -> Section:
    """(1) tokens/s against length on the CPU and (if any) the GPU, every model at each length in turn."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lengths = list(s.throughput_lengths)
    tables, panels, values = [], [], {"params": {}, "ratios": {}, "lengths": lengths}
    for device in devices:
        d_model, n_layers, tokens = s.throughput_gpu if device == "cuda" else s.throughput_cpu
        kw = {"d_model": d_model, "n_layers": n_layers, "dropout": 0.0, "attention": "general"}
        torch.manual_seed(seed)
        models = {m: build_model(m, 256, max(lengths), **kw) for m in THROUGHPUT_MODELS}
        params = {m: count_params(model) for m, model in models.items()}
        rates: dict[str, list[float]] = {m: [] for m in models}
        for length in lengths:
            batch = max(1, tokens // length)
            measured = train_throughput(models, length, batch, repeats=s.throughput_repeats, device=device, seed=seed)
            for m in models:
                rates[m].append(measured[m])
        models = None
        if device == "cuda":
            torch.cuda.empty_cache()
        ratios = {m: [t / r for t, r in zip(rates["transformer"], rates[m])] for m in ("lstm", "gru")}
        rows = [
            [L, max(1, tokens // L), *(round(rates[m][i]) for m in THROUGHPUT_MODELS)]
            + [round(ratios["lstm"][i], 2), round(ratios["gru"][i], 2)]
            for i, L in enumerate(lengths)
        ]
        name = _device_name(device)
        tables.append(
            Table(
                "Training throughput (forward + backward, source + target tokens/s) on " + name,
                ["length", "batch", *(f"{m} tok/s" for m in THROUGHPUT_MODELS), "transformer/lstm", "transformer/gru"],
                rows,
                note="Parameters: "
                + ", ".join(f"{m} {params[m]:,}" for m in THROUGHPUT_MODELS)
                + f" (d_model {d_model}, {n_layers} + {n_layers} layers). {tokens:,} tokens per step at every length; "
                f"models interleaved, best of {s.throughput_repeats}; RNNs with bilinear (SDPA) attention.",
            )
        )
        panels.append((name, lengths, rates))
        values["params"][device], values["ratios"][device] = params, ratios
    _plot_lines(out_dir / "throughput.png", panels, "sequence length", "training tokens / s", logx=True, logy=True)
    figure = Figure(
        "Training throughput vs length",
        "throughput.png",
        "Forward + backward tokens/s at equal parameter count (log-log), one panel per device.",
    )
    return Section(tables, [figure], values)


def _train_synthetic(job: tuple[str, int, str, Settings, int, bool]) -> tuple[dict[str, float], int, Any]:
    """Train one model on one synthetic task and score it: (metrics, parameters, the model if ``keep``, on CPU)."""
    task_name, length, m, s, seed, keep = job
    seed_everything(seed)  # the same initial weights in this process or another
    task = SyntheticTask(task_name, length, s.task_batch)
    cfg = _train_config(s.task_steps, s.task_batch, s.task_lr, seed)
    r = train_seq(m, task, None, cfg, d_model=s.d_model, n_layers=s.n_layers, dropout=0.0)
    metrics = evaluate(r.model, task, n_examples=s.eval_examples, seed=seed + 1)
    return metrics, r.params, r.model.cpu() if keep else None


def _map_jobs(fn: Callable[[Any], Any], jobs: list[Any], workers: int) -> list[Any]:
    """``[fn(job) for job in jobs]``, in ``workers`` fresh processes when more than one (CUDA needs spawn)."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(min(workers, len(jobs)), mp_context=ctx, initializer=torch.set_num_threads,
                             initargs=(1,)) as pool:  # fmt: skip
        return list(pool.map(fn, jobs))


def accuracy_section(s: Settings, seed: int, out_dir: Path) -> Section:
    """(2) exact match against L per task and model; keeps the copy models at the longest L for (3)."""
    keys = [(t, L, m) for t in s.tasks for L in s.lengths for m in MODELS]
    workers = s.workers if torch.cuda.is_available() else 1
    jobs = [(t, L, m, s, seed, t == "copy" and L == max(s.lengths)) for t, L, m in keys]
    done = _map_jobs(_train_synthetic, jobs, workers)
    acc = {key: metrics for key, (metrics, _, _) in zip(keys, done)}
    params = {m: n for (_, _, m), (_, n, _) in zip(keys, done)}
    copy_models = {m: model for (_, _, m), (_, _, model) in zip(keys, done) if model is not None}
    exact = {key: v["exact_match"] for key, v in acc.items()}
    rows = [[t, L, *(round(exact[(t, L, m)], 3) for m in MODELS)] for t in s.tasks for L in s.lengths]
    fails = []
    for t in s.tasks:
        first = [next((f"L={L}" for L in s.lengths if exact[(t, L, m)] < 0.5), f"> {max(s.lengths)}") for m in MODELS]
        fails.append([t, *first])
    tables = [
        Table(
            f"Sequence exact match vs dependency length L ({s.task_steps} steps x batch {s.task_batch} each)",
            ["task", "L", *MODELS],
            rows,
            note="Parameters: "
            + ", ".join(f"{m} {params[m]:,}" for m in MODELS)
            + f" (vocabulary {SYNTH_VOCAB_SIZE}). Token accuracy in result.json settings.",
        ),
        Table("Where each model fails (shortest L with exact match < 0.5)", ["task", *MODELS], fails),
    ]
    panels = [(t, list(s.lengths), {m: [exact[(t, L, m)] for L in s.lengths] for m in MODELS}) for t in s.tasks]
    _plot_lines(
        out_dir / "accuracy_vs_length.png",
        panels,
        "dependency length L",
        "exact match",
        logx=True,
        logy=False,
        ylim=(-0.03, 1.03),
    )
    figure = Figure(
        "Accuracy vs dependency length",
        "accuracy_vs_length.png",
        "Sequence exact match on held-out examples after a fixed training budget.",
    )
    token_acc = {f"{t}/{L}/{m}": round(v["token_acc"], 4) for (t, L, m), v in acc.items()}
    return Section(tables, [figure], {"params": params, "copy_models": copy_models, "token_accuracy": token_acc})


def gradient_section(s: Settings, seed: int, out_dir: Path, copy_models: dict[str, Any]) -> Section:
    """(3) ||d f / d x_t|| against distance at init (length ``grad_length``) and after the copy training."""
    trained_len = max(s.lengths)
    init, trained = {}, {}
    for m in MODELS:
        torch.manual_seed(seed)
        model = build_model(m, SYNTH_VOCAB_SIZE, s.grad_length, d_model=s.d_model, n_layers=s.n_layers, dropout=0.0)
        init[m] = input_gradient_norms(model, s.grad_length, seed=seed)
        trained[m] = input_gradient_norms(copy_models[m], trained_len, seed=seed)
    # Slopes over distances 1..: the last position itself has a direct path in every model.
    slope_init = {m: decay_rate(init[m][1:]) for m in MODELS}
    slope_trained = {m: decay_rate(trained[m][1:]) for m in MODELS}
    rows = [
        [
            m,
            f"{slope_init[m]:.4f}",
            f"{slope_trained[m]:.4f}",
            f"{float(init[m][-1] / init[m][1].clamp(min=1e-30)):.2e}",
        ]
        for m in MODELS
    ]
    table = Table(
        "Decay of ||d f / d x_t|| with distance (slope of log10 norm per step; more negative = vanishes faster)",
        [
            "model",
            f"at init (L={s.grad_length})",
            f"after copy training (L={trained_len})",
            f"norm at distance {s.grad_length - 1} / distance 1, at init",
        ],
        rows,
        note="f = w . h_last for random unit w; RNNs: forward-direction annotation at the last source position. "
        "Slopes fitted over distances 1.. (the last position itself has a direct path in every model).",
    )
    panels = [
        (f"at init (L={s.grad_length})", list(range(s.grad_length)), {m: init[m].tolist() for m in MODELS}),
        (f"after copy training (L={trained_len})", list(range(trained_len)), {m: trained[m].tolist() for m in MODELS}),
    ]
    _plot_lines(
        out_dir / "gradient_vs_distance.png",
        panels,
        "distance from the output (positions)",
        "||d f / d x_t||",
        logx=False,
        logy=True,
    )
    figure = Figure(
        "Gradient norm vs distance",
        "gradient_vs_distance.png",
        "Norm of the gradient of the encoder's last state w.r.t. each input embedding.",
    )
    return Section([table], [figure], {"decay_init": slope_init, "decay_trained": slope_trained})


def stdlib_doc_section(s: Settings, seed: int, out_dir: Path) -> Section:
    """(4) BLEU / exact match on stdlib code summarisation after ``doc_seconds`` of training each."""
    doc = StdlibDocTask(
        run_dir=str(out_dir / "stdlib-doc"),
        vocab_size=s.doc_vocab,
        max_src_len=s.doc_src_len,
        max_tgt_len=s.doc_tgt_len,
        batch_size=s.doc_batch,
        max_train=s.doc_max_train,
        max_test=s.doc_max_test,
    )
    rows, scores = [], {}
    for m in MODELS:
        cfg = _train_config(10**7, s.doc_batch, s.doc_lr, seed, constant=True)
        kw = {"d_model": s.doc_d_model or s.d_model, "n_layers": s.n_layers, "dropout": 0.1, "warmup": 20}
        r = train_seq(m, doc, None, cfg, time_budget=s.doc_seconds, **kw)
        scores[m] = evaluate(r.model, doc)
        rows.append(
            [
                m,
                f"{r.params:,}",
                r.steps,
                round(r.seconds, 1),
                round(scores[m]["bleu"], 2),
                round(scores[m]["exact_match"], 3),
            ]
        )
    table = Table(
        f"stdlib code summarisation after {s.doc_seconds:g} s of training each (greedy decoding)",
        ["model", "params", "steps", "seconds", "BLEU", "exact match"],
        rows,
        note=f"{len(doc.train_records)} train / {len(doc.test_records)} test functions, split by module; "
        f"BPE vocabulary {doc.vocab}; source <= {s.doc_src_len} tokens, summary <= {s.doc_tgt_len}.",
    )
    return Section([table], [], {"bleu": {m: v["bleu"] for m, v in scores.items()}})


@contextlib.contextmanager
def _small_model_threads() -> Iterator[None]:
    """One intra-op thread on CPU while training the small models: their ops are too small to
    split, and on a busy machine a second thread mostly waits (several times slower)."""
    before = torch.get_num_threads()
    if not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run(out_dir: Path, quick: bool = False, seed: int = 0, tiny: bool = False) -> ClaimResult:
    """Run the four measurements; ``quick`` for ``make demo``, ``tiny`` for tests (numbers meaningless)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    s = TINY if tiny else QUICK if quick else FULL_GPU if torch.cuda.is_available() else FULL
    t_start = time.perf_counter()
    seed_everything(seed)
    seconds = {}

    def timed(name: str, fn: Callable[..., Section], *args: Any) -> Section:
        t0 = time.perf_counter()
        out = fn(*args)
        seconds[name] = round(time.perf_counter() - t0, 1)
        return out

    speed = timed("throughput", throughput_section, s, seed, out_dir)
    with _small_model_threads():
        acc = timed("accuracy", accuracy_section, s, seed, out_dir)
        grads = timed("gradients", gradient_section, s, seed, out_dir, acc.values.pop("copy_models"))
        doc = timed("stdlib-doc", stdlib_doc_section, s, seed, out_dir)
    sections = (speed, acc, grads, doc)

    lengths = speed.values["lengths"]
    grows = {dev: all(r[-1] > r[0] for r in ratios.values()) for dev, ratios in speed.values["ratios"].items()}
    judged = "cuda" if "cuda" in grows else "cpu"  # the parallelism claim is about parallel hardware
    parallel = grows[judged]
    decay = grads.values["decay_init"]
    steepest = min(decay, key=decay.get)
    verdict = "holds" if parallel and steepest == "rnn" else "does not hold"

    def throughput_line(dev: str) -> str:
        r = speed.values["ratios"][dev]
        return (
            f"on {_device_name(dev)} Transformer/LSTM goes from {r['lstm'][0]:.2f}x at length {lengths[0]} to "
            f"{r['lstm'][-1]:.2f}x at {lengths[-1]}, Transformer/GRU from {r['gru'][0]:.2f}x to "
            f"{r['gru'][-1]:.2f}x ({'grows' if grows[dev] else 'does not grow for both'} with length"
            + ("; judged" if dev == judged and len(grows) > 1 else "")
            + ")"
        )

    summary = (
        "Throughput: "
        + "; ".join(throughput_line(dev) for dev in grows)
        + ". Gradient decay at init (slope of log10 norm per position): "
        + ", ".join(f"{m} {decay[m]:.3f}" for m in MODELS)
        + f"; steepest: {steepest}. Accuracy and BLEU are at a fixed budget ({s.task_steps} steps x batch "
        f"{s.task_batch} per task, {s.doc_seconds:g} s per model on stdlib-doc): they show where each model "
        "starts to fail at that budget, not its capacity."
    )
    settings = dataclasses.asdict(s)
    settings.update(
        throughput_params=speed.values["params"],
        task_params=acc.values["params"],
        token_accuracy=acc.values["token_accuracy"],
        decay_init=decay,
        decay_trained=grads.values["decay_trained"],
        bleu=doc.values["bleu"],
        seed=seed,
        mode="tiny" if tiny else "quick" if quick else "full",
        section_seconds=seconds,
    )
    return ClaimResult(
        name=NAME,
        title=TITLE,
        claim=CLAIM,
        verdict=verdict,
        summary=summary,
        tables=[t for sec in sections for t in sec.tables],
        figures=[f for sec in sections for f in sec.figures],
        settings=settings,
        seconds=time.perf_counter() - t_start,
    )


def _plot_lines(
    path: Path,
    panels: list[tuple[str, list[int], dict[str, list[float]]]],
    xlabel: str,
    ylabel: str,
    logx: bool,
    logy: bool,
    ylim: tuple[float, float] | None = None,
) -> None:
    """One PNG with a panel per (title, x, {name: y})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4), squeeze=False)
    for ax, (title, x, series) in zip(axes[0], panels):
        for name, y in series.items():
            if logy:  # an underflowed gradient (0) has no logarithm: leave a gap
                y = [v if v > 0 else float("nan") for v in y]
            ax.plot(x[: len(y)], y, marker="o" if len(x) < 20 else None, markersize=3, label=name)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        if ylim is not None:
            ax.set_ylim(*ylim)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({torch.get_num_threads()} threads)"
