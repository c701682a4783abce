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

Measurement 1 uses every CPU thread in a full run and one in a quick one; 2-4 train small models
on one thread (on CPU), which is faster for them than two threads on a shared machine, and makes
their numbers independent of the machine's load. On a GPU the full run trains longer (the
``FULL_GPU`` settings) and runs the trainings of (2) in several processes at once: models this
small leave the card mostly idle.

Decision rule (``notelab.reproduce.rules``; 95% t-intervals):

- parallel over time: on a GPU, the Transformer's speed relative to LSTM and to GRU must grow from
  the shortest length to the longest: per interleaved round (every model at every length, so a
  load burst hits all), log((T/m at the longest) / (T/m at the shortest)), interval above 0. On a
  CPU those timings are shown with their intervals but not judged (with two cores or a busy
  machine they measure how many cores were free, not the architectures); the claim is judged
  there by sequential depth, the dependent steps of a forward pass counted from the models'
  structure (Vaswani et al., Table 1), which no load changes.
- vanishing gradients: per initialisation seed, the vanilla RNN's decay slope minus the steepest
  other model's, interval below 0 (the RNN's gradient vanishes fastest with distance).

Accuracy and BLEU are reported, not judged: at a fixed budget they say where a model starts to
fail, not how far each would go.

A full run on a GPU took 476 s on an H200 (2026-11-29; part (4) trains eager since, see ``_train_doc``).
Each finished piece (a device's throughput rounds, each training of (2) with its scores, each model of (4))
is kept (``notelab.reproduce.memo``), so the same command run again after a stop computes only what is
missing.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from notelab.core.runtime import seed_everything
from notelab.reproduce import rules
from notelab.reproduce.base import (
    ClaimResult,
    Figure,
    PaperNumber,
    Progress,
    Section,
    Table,
    begin,
    derived_seeds,
    mean_std,
    one_thread,
)
from notelab.reproduce.memo import Memo
from notelab.seq.factory import MODELS, build_model, count_params, load_model
from notelab.seq.probes import best_times, decay_rate, input_gradient_norms, make_train_step
from notelab.seq.tasks import SYNTH_VOCAB_SIZE, StdlibDocTask, SyntheticTask
from notelab.seq.training import evaluate, train_seq
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
    throughput_repeats: (
        int  # interleaved rounds (every model at every length per round); medians and intervals over them
    )
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]  # dependency lengths L of the synthetic tasks
    task_steps: int  # training steps per (task, L, model)
    task_batch: int
    task_lr: float
    eval_examples: int
    grad_length: int  # source length of the gradient probe at init
    grad_seeds: int  # initialisations probed (the interval of the decay check is over these)
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
    throughput_repeats=5,
    tasks=("copy", "reverse", "adding"),
    lengths=(8, 16, 32, 64),
    task_steps=300,
    task_batch=32,
    task_lr=3e-3,
    eval_examples=256,
    grad_length=128,
    grad_seeds=5,
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
    throughput_repeats=5,
    tasks=("copy", "reverse", "adding"),
    lengths=(8, 16),
    task_steps=100,
    task_batch=32,
    task_lr=5e-3,
    eval_examples=64,
    grad_length=64,
    grad_seeds=5,
    doc_seconds=4.0,
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
    throughput_repeats=2,
    tasks=("copy", "adding"),
    lengths=(4,),
    task_steps=3,
    task_batch=8,
    task_lr=3e-3,
    eval_examples=8,
    grad_length=8,
    grad_seeds=2,
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


def sequential_steps(model: str, n_layers: int, src_len: int, tgt_len: int) -> int:
    """Dependent steps of one encoder-decoder forward pass (Vaswani et al. 2017, Table 1: O(1)
    sequential operations per self-attention layer, O(n) per recurrent layer).

    Transformer: one step per layer, encoder then decoder. RNN: a layer's state at t needs its
    state at t - 1; stacked layers can run as a wavefront, so a stack of n over L positions takes
    L + n - 1 steps (the fewest of any schedule), encoder then decoder.
    """
    if model == "transformer":
        return 2 * n_layers
    return (src_len + n_layers - 1) + (tgt_len + n_layers - 1)


def throughput_checks(
    rates: dict[str, list[list[float]]], lengths: list[int], n_layers: int, decides: bool
) -> list[rules.Check]:
    """The parallelism checks: measured throughput growth (``rates[model][round][length]`` tokens/s,
    every model timed in each round) and the sequential depth counted from the models' structure."""
    checks = []
    for m in ("lstm", "gru"):
        growth = [
            math.log((t[-1] / r[-1]) / (t[0] / r[0])) for t, r in zip(rates["transformer"], rates[m])
        ]  # per round: log of (Transformer / m at the longest length) over the same at the shortest
        checks.append(
            rules.check(
                "parallel over time",
                f"throughput growth Transformer/{m.upper()} from length {lengths[0]} to {lengths[-1]} (log)",
                "per interleaved round, log of the speed ratio at the longest length over the shortest; above 0"
                + ("" if decides else "; reported, not judged, on a CPU: it measures how many cores were free"),
                growth,
                0.0,
                below=False,
                role="decides" if decides else "reported",
            )
        )
    depth = [sequential_steps("gru", n_layers, L, L) / sequential_steps("transformer", n_layers, L, L) for L in lengths]
    checks.append(
        rules.check(
            "parallel over time",
            f"sequential depth RNN / Transformer, length {lengths[-1]} over length {lengths[0]}",
            "dependent steps per forward pass (counted from the architectures, load-independent); the RNN's grows "
            "with length, the Transformer's does not: above 1",
            [depth[-1] / depth[0]],
            1.0,
            below=False,
            exact=True,
        )
    )
    return checks


def _measure_throughput(s: Settings, seed: int, device: str, progress: Progress) -> dict[str, Any]:
    """tokens/s of every model at every length, ``throughput_repeats`` interleaved rounds after a warm-up
    round: ``{"params": {model: n}, "rates": {model: [[tokens/s per length] per round]}}``."""
    lengths = list(s.throughput_lengths)
    d_model, n_layers, tokens = s.throughput_gpu if device == "cuda" else s.throughput_cpu
    kw = {"d_model": d_model, "n_layers": n_layers, "dropout": 0.0, "attention": "general"}
    torch.manual_seed(seed)
    models = {m: build_model(m, 256, max(lengths), **kw) for m in THROUGHPUT_MODELS}
    params = {m: count_params(model) for m, model in models.items()}
    steps = {
        (m, L): make_train_step(model, L, max(1, tokens // L), device=device, seed=seed)
        for L in lengths
        for m, model in models.items()
    }
    best_times(steps, 1, device)  # warm-up round
    rates: dict[str, list[list[float]]] = {m: [] for m in models}
    for r in range(s.throughput_repeats):
        progress.step(r + 1, s.throughput_repeats, f"{_device_name(device)}: every model at every length")
        times = best_times(steps, 1, device)
        for m in models:
            rates[m].append([2 * max(1, tokens // L) * L / times[(m, L)] for L in lengths])
    models = steps = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"params": params, "rates": rates}


def throughput_section(s: Settings, seed: int, out_dir: Path, progress: Progress, memo: Memo) -> Section:
    """(1) tokens/s against length on the CPU and (if any) the GPU: in each round every model runs at
    every length in turn, so a load burst hits all of them; medians and intervals over rounds."""
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    lengths = list(s.throughput_lengths)
    tables, panels, checks = [], [], []
    values: dict[str, Any] = {"params": {}, "ratios": {}, "lengths": lengths, "names": {}}
    for device in devices:
        d_model, n_layers, tokens = s.throughput_gpu if device == "cuda" else s.throughput_cpu
        measured = memo.value(f"throughput-{device}", lambda d=device: _measure_throughput(s, seed, d, progress))
        params, rates = measured["params"], measured["rates"]
        median_rate = {m: [statistics.median(r[i] for r in rates[m]) for i in range(len(lengths))] for m in rates}
        ratios = {
            m: [
                statistics.median(t[i] / o[i] for t, o in zip(rates["transformer"], rates[m]))
                for i in range(len(lengths))
            ]
            for m in ("lstm", "gru")
        }
        rows = [
            [L, max(1, tokens // L), *(round(median_rate[m][i]) for m in THROUGHPUT_MODELS)]
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
                f"medians over {s.throughput_repeats} interleaved rounds (ratios: median of per-round ratios); "
                "RNNs with bilinear (SDPA) attention.",
            )
        )
        panels.append((name, lengths, median_rate))
        values["params"][device], values["ratios"][device], values["names"][device] = params, ratios, name
        judged_here = device == devices[-1]  # the GPU when there is one: the claim is about parallel hardware
        checks += [
            dataclasses.replace(c, name=f"{name}: {c.name}")
            for c in throughput_checks(rates, lengths, n_layers, decides=judged_here and device == "cuda")
            if not c.exact or judged_here
        ]
    _plot_lines(out_dir / "throughput.png", panels, "sequence length", "training tokens / s", logx=True, logy=True)
    figure = Figure(
        "Training throughput vs length",
        "throughput.png",
        "Forward + backward tokens/s at equal parameter count (log-log), one panel per device.",
    )
    return Section([*tables], [figure], values, checks)


def _train_synthetic(
    job: tuple[str, int, str, Settings, int, bool, Memo],
) -> tuple[dict[str, float], int, Any]:
    """Train one model on one synthetic task and score it: (metrics, parameters, the model if ``keep``, on CPU);
    from ``memo`` when an earlier run finished this training (the kept model from its checkpoint there)."""
    task_name, length, m, s, seed, keep, memo = job
    key = f"accuracy-{task_name}-L{length}-{m}"
    trained: dict[str, Any] = {}

    def train() -> dict[str, Any]:
        seed_everything(seed)  # the same initial weights in this process or another
        task = SyntheticTask(task_name, length, s.task_batch)
        cfg = _train_config(s.task_steps, s.task_batch, s.task_lr, seed)
        r = train_seq(m, task, None, cfg, d_model=s.d_model, n_layers=s.n_layers, dropout=0.0)
        metrics = evaluate(r.model, task, n_examples=s.eval_examples, seed=seed + 1)
        trained["model"] = r.model.cpu()
        if keep and (folder := memo.folder(key)) is not None:
            r.model.save_pretrained(folder)  # durable before the piece that refers to it
        return {"metrics": metrics, "params": r.params}

    piece = memo.value(key, train)
    model = None
    if keep:
        model = trained["model"] if "model" in trained else load_model(memo.folder(key)).eval()
    return piece["metrics"], piece["params"], model


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


def accuracy_section(s: Settings, seed: int, out_dir: Path, progress: Progress, memo: Memo) -> Section:
    """(2) exact match against L per task and model; keeps the copy models at the longest L for (3)."""
    keys = [(t, L, m) for t in s.tasks for L in s.lengths for m in MODELS]
    workers = s.workers if torch.cuda.is_available() else 1
    jobs = [(t, L, m, s, seed, t == "copy" and L == max(s.lengths), memo) for t, L, m in keys]
    if workers > 1:
        progress.say(f"  {len(jobs)} trainings in {workers} processes")
        done = _map_jobs(_train_synthetic, jobs, workers)
    else:
        done = []
        for i, job in enumerate(jobs):
            progress.step(i + 1, len(jobs), f"{job[0]} L={job[1]} {job[2]} ({s.task_steps} steps)")
            done.append(_train_synthetic(job))
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


def gradient_check(decay: dict[str, list[float]]) -> rules.Check:
    """The vanishing-gradient check: per initialisation, the RNN's decay slope minus the steepest
    other model's (negative: the vanilla RNN's gradient vanishes fastest with distance)."""
    others = [m for m in decay if m != "rnn"]
    gaps = [r - min(decay[m][k] for m in others) for k, r in enumerate(decay["rnn"])]
    return rules.check(
        "vanishing gradients",
        "RNN decay slope minus the steepest other model's, at init",
        "per initialisation seed, slope of log10 ||d f / d x_t|| per position; below 0 (the RNN's vanishes fastest)",
        gaps,
        0.0,
        below=True,
    )


def gradient_section(s: Settings, seed: int, out_dir: Path, copy_models: dict[str, Any], progress: Progress) -> Section:
    """(3) ||d f / d x_t|| against distance at init (length ``grad_length``, ``grad_seeds``
    initialisations) and after the copy training."""
    trained_len = max(s.lengths)
    init, trained, decay = {}, {}, {m: [] for m in MODELS}
    for i, init_seed in enumerate(derived_seeds(seed, s.grad_seeds)):
        progress.step(i + 1, s.grad_seeds, f"initialisation seed {init_seed}")
        for m in MODELS:
            torch.manual_seed(init_seed)
            kw = {"d_model": s.d_model, "n_layers": s.n_layers, "dropout": 0.0}
            norms = input_gradient_norms(
                build_model(m, SYNTH_VOCAB_SIZE, s.grad_length, **kw), s.grad_length, seed=init_seed
            )
            # Slopes over distances 1..: the last position itself has a direct path in every model.
            decay[m].append(decay_rate(norms[1:]))
            init.setdefault(m, norms)  # the first seed's curve for the table and figure
    for m in MODELS:
        trained[m] = input_gradient_norms(copy_models[m], trained_len, seed=seed)
    slope_init = {m: statistics.fmean(decay[m]) for m in MODELS}
    slope_trained = {m: decay_rate(trained[m][1:]) for m in MODELS}
    rows = [
        [
            m,
            mean_std(decay[m], 4),
            f"{slope_trained[m]:.4f}",
            f"{float(init[m][-1] / init[m][1].clamp(min=1e-30)):.2e}",
        ]
        for m in MODELS
    ]
    table = Table(
        "Decay of ||d f / d x_t|| with distance (slope of log10 norm per step; more negative = vanishes faster)",
        [
            "model",
            f"at init (L={s.grad_length}, {s.grad_seeds} seeds)",
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
    values = {"decay_init": slope_init, "decay_init_seeds": decay, "decay_trained": slope_trained}
    return Section([table], [figure], values, [gradient_check(decay)])


def _train_doc(m: str, doc: StdlibDocTask, s: Settings, seed: int) -> dict[str, Any]:
    """One model trained on stdlib-doc for ``doc_seconds``, then scored: parameters, steps, seconds, scores."""
    # Eager: the batches are trimmed to their longest source, so a compiled model would recompile for new shapes
    # inside the wall-clock budget, by a different amount per architecture (fit compiles on CUDA by default).
    cfg = dataclasses.replace(_train_config(10**7, s.doc_batch, s.doc_lr, seed, constant=True), compile=False)
    kw = {"d_model": s.doc_d_model or s.d_model, "n_layers": s.n_layers, "dropout": 0.1, "warmup": 20}
    r = train_seq(m, doc, None, cfg, time_budget=s.doc_seconds, **kw)
    return {"params": r.params, "steps": r.steps, "seconds": r.seconds, "scores": evaluate(r.model, doc)}


def stdlib_doc_section(s: Settings, seed: int, out_dir: Path, progress: Progress, memo: Memo) -> Section:
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
    for i, m in enumerate(MODELS):
        progress.step(i + 1, len(MODELS), f"{m} for {s.doc_seconds:g} s")
        r = memo.value(f"doc-{m}", lambda m=m: _train_doc(m, doc, s, seed))
        scores[m] = r["scores"]
        rows.append(
            [
                m,
                f"{r['params']:,}",
                r["steps"],
                round(r["seconds"], 1),
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


def run(
    out_dir: Path, quick: bool = False, seed: int = 0, tiny: bool = False, progress: Progress | None = None
) -> ClaimResult:
    """Run the four measurements; ``quick`` for ``make demo``, ``tiny`` for tests (numbers meaningless)."""
    out_dir, progress, t_start = begin(out_dir, seed, progress)
    s = TINY if tiny else QUICK if quick else FULL_GPU if torch.cuda.is_available() else FULL
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    memo = Memo(out_dir, __file__, claim=NAME, settings=dataclasses.asdict(s), seed=seed, device=device)
    resumed = memo.pieces()
    if resumed:
        progress.say(f"  picking up a stopped run: {resumed} finished pieces in {memo.root}")
    # Quick (and tiny) runs measure everything on one CPU thread: their numbers then do not depend on
    # how busy the machine is. A full run gives the throughput measurement every thread it has.
    with one_thread(quick or tiny):
        with progress.part(f"(1) throughput, {s.throughput_repeats} interleaved rounds"):
            speed = throughput_section(s, seed, out_dir, progress, memo)
    with one_thread():  # small models: one thread is faster for them than two on a shared machine
        with progress.part("(2) accuracy vs dependency length"):
            acc = accuracy_section(s, seed, out_dir, progress, memo)
        with progress.part(f"(3) gradient norm vs distance, {s.grad_seeds} initialisations"):
            grads = gradient_section(s, seed, out_dir, acc.values.pop("copy_models"), progress)
        with progress.part(f"(4) stdlib code summarisation, {s.doc_seconds:g} s per model"):
            doc = stdlib_doc_section(s, seed, out_dir, progress, memo)
    sections = (speed, acc, grads, doc)
    checks = [c for sec in sections for c in sec.checks]
    result = ClaimResult.from_sections(
        NAME, TITLE, CLAIM, sections, summary=_summary(s, speed, grads, rules.group_verdicts(checks)),
        settings=_settings(s, speed, acc, grads, doc, seed, "tiny" if tiny else "quick" if quick else "full"),
        t_start=t_start, progress=progress, paper=_paper(s, speed.values["lengths"], grads.values["decay_init"]),
    )  # fmt: skip
    return dataclasses.replace(result, resumed_pieces=resumed)


def _paper(s: Settings, lengths: list[int], decay: dict[str, float]) -> list[PaperNumber]:
    source = "Vaswani et al. 2017, Table 1"
    L0, L1, n = lengths[0], lengths[-1], s.throughput_cpu[1]
    return [
        PaperNumber(
            "sequential operations per layer",
            "self-attention O(1), recurrent O(n)",
            source,
            f"per forward pass ({n} + {n} layers): Transformer {sequential_steps('transformer', n, L0, L0)} at "
            f"length {L0} and at {L1}; RNN {sequential_steps('rnn', n, L0, L0)} at {L0}, "
            f"{sequential_steps('rnn', n, L1, L1)} at {L1}",
        ),
        PaperNumber(
            "maximum path length between positions",
            "self-attention O(1), recurrent O(n)",
            source,
            "gradient decay with distance at init (slope of log10 norm per position): "
            + ", ".join(f"{m} {v:.3f}" for m, v in decay.items()),
        ),
    ]


def _summary(s: Settings, speed: Section, grads: Section, parts: dict[str, str]) -> str:
    lengths = speed.values["lengths"]

    def throughput_line(dev: str) -> str:
        r = speed.values["ratios"][dev]
        return (
            f"on {speed.values['names'][dev]} Transformer/LSTM goes from {r['lstm'][0]:.2f}x at length {lengths[0]} to "
            f"{r['lstm'][-1]:.2f}x at {lengths[-1]}, Transformer/GRU from {r['gru'][0]:.2f}x to {r['gru'][-1]:.2f}x"
        )

    decay = grads.values["decay_init"]
    judged = "the GPU's measured throughput" if "cuda" in speed.values["ratios"] else "sequential depth"
    return (
        f"Parallel over time ({parts['parallel over time']}, judged by {judged}): "
        + "; ".join(throughput_line(dev) for dev in speed.values["ratios"])
        + " (medians over interleaved rounds). Vanishing gradients ("
        + parts["vanishing gradients"]
        + f"): decay at init over {s.grad_seeds} initialisations (mean slope of log10 norm per position): "
        + ", ".join(f"{m} {decay[m]:.3f}" for m in MODELS)
        + f". Accuracy and BLEU are at a fixed budget ({s.task_steps} steps x batch {s.task_batch} per task, "
        f"{s.doc_seconds:g} s per model on stdlib-doc): they show where each model starts to fail at that budget, "
        "not its capacity."
    )


def _settings(s: Settings, speed: Section, acc: Section, grads: Section, doc: Section, seed: int, mode: str) -> dict:
    settings = dataclasses.asdict(s)
    settings.update(
        throughput_params=speed.values["params"],
        throughput_ratios=speed.values["ratios"],
        task_params=acc.values["params"],
        token_accuracy=acc.values["token_accuracy"],
        decay_init=grads.values["decay_init"],
        decay_init_seeds=grads.values["decay_init_seeds"],
        decay_trained=grads.values["decay_trained"],
        bleu=doc.values["bleu"],
        seed=seed,
        mode=mode,
    )
    return settings


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
    n = torch.get_num_threads()
    return f"CPU ({n} thread{'s' if n > 1 else ''})"
