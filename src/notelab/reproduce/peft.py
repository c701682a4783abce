"""Claim: parameter-efficient fine-tuning trains a small fraction of the parameters, needs far less memory
than full fine-tuning (Qwen1.5-7B ~160 GB, 72B ~1,600 GB in full), and comes close to full fine-tuning.

Hu et al. 2021 ("LoRA", sec. 4.2: 3x less memory for GPT-3 175B); Houlsby et al. 2019 (adapters);
Li & Liang 2021 ("Prefix-Tuning", sec. 6.3: prefix tuning beats fine-tuning with little data);
Lester et al. 2021 (prompt tuning); Liu et al. 2022 (IA3).

Three measurements:

1. The memory estimator (``notelab.peft.estimate``: the peak of ``notelab.train.fit``'s default path) for
   Qwen1.5-7B / 72B, full fine-tuning vs LoRA (r = 16 on every linear), bf16 autocast with AdamW, batch
   1 x 2048 tokens, and full fine-tuning sharded over 8 GPUs (FSDP, bytes per GPU). Decided (noise-free):
   the full totals lie within a factor 2 of the note's 160 GB / 1,600 GB, and LoRA needs < 1/3 of full.
2. A LLaMA pre-trained briefly on the standard-library corpus, fine-tuned to write a function's
   docstring summary from its signature with each method (full, LoRA at several ranks, Houlsby and
   Pfeiffer adapters, prefix tuning, prompt tuning, IA3), the same steps each: trainable fraction,
   validation loss, BLEU of greedy summaries, time, peak memory (CUDA; on the CPU the estimator's
   figure for the tiny model). Decided: per seed, LoRA (r = 8) recovers more than half of full
   fine-tuning's validation-loss gain over the base model (95% t-interval of the ratio above 0.5).
3. Low data (100 training examples): per seed, full fine-tuning's validation loss minus prefix
   tuning's; the paper says above 0. Tiny models, few steps, not GPT-2: it can make the claim
   inconclusive, not refute it.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from notelab.core.runtime import seed_everything
from notelab.reproduce import rules
from notelab.reproduce.base import ClaimResult, Figure, PaperNumber, Progress, Section, Table, begin, one_thread

NAME = "peft"
TITLE = "Parameter-efficient fine-tuning: memory and quality against full fine-tuning"
CLAIM = ("PEFT trains a small fraction of the parameters, needs far less memory than full fine-tuning "
         "(Qwen1.5-7B ~160 GB, 72B ~1,600 GB), and comes close to it in quality")  # fmt: skip
NOTE_GB = {"qwen1.5-7b": 160.0, "qwen1.5-72b": 1600.0}


@dataclass(frozen=True)
class Settings:
    dim: int = 64
    n_layers: int = 2
    vocab: int = 512
    max_chars: int = 200_000
    seq: int = 64
    pre_steps: int = 100
    ft_steps: int = 30
    batch: int = 16
    n_train: int = 600
    n_val: int = 64
    n_bleu: int = 4
    bleu_tokens: int = 12
    ranks: tuple[int, ...] = (1, 8)
    seeds: int = 3  # repeats of full and LoRA r=8 (the decided check) and of the low-data pair
    low_data: int = 100
    low_steps: int = 20
    own_split: bool = True  # fine-tune on part of the stdlib's val-split functions, validate on the rest


QUICK = Settings()
FULL = Settings(dim=128, n_layers=4, vocab=2048, max_chars=2_000_000, seq=128, pre_steps=1500, ft_steps=300,
                n_train=4000, n_val=256, n_bleu=64, bleu_tokens=20, ranks=(1, 4, 16, 64), seeds=5,
                low_steps=200, own_split=False)  # fmt: skip
TINY = Settings(dim=32, vocab=300, max_chars=20_000, seq=32, pre_steps=4, ft_steps=3, batch=4, n_train=40, n_val=8,
                n_bleu=2, bleu_tokens=3, ranks=(2,), seeds=2, low_data=20, low_steps=2)  # fmt: skip
LR = {"full": 1e-3, "lora": 5e-3, "ia3": 2e-2, "houlsby": 5e-3, "pfeiffer": 5e-3, "prefix": 1e-2, "prompt": 3e-2}


def estimator_section() -> Section:
    """(1) The estimator's table and its noise-free checks."""
    from notelab.lm.loss import default_chunk
    from notelab.peft.estimate import PRESETS, MethodSpec, estimate

    rows, checks, values = [], [], {}
    for model, note in NOTE_GB.items():
        shape = PRESETS[model]
        kw = dict(dtype="bf16", optimizer="adamw", batch=1, seq=2048, loss_chunk=default_chunk(shape.vocab_size))
        full = estimate(shape, MethodSpec("full"), **kw)
        lora = estimate(shape, MethodSpec("lora", r=16), **kw)
        sharded = estimate(shape, MethodSpec("full"), **kw, world_size=8)
        for label, e in (("full", full), ("LoRA r=16", lora), ("full, FSDP over 8", sharded)):
            sizes = (e.weights, e.gradients, e.optimizer, e.activations, e.activations_checkpointed, e.total,
                     e.total_checkpointed)  # fmt: skip
            rows.append([model, label, f"{100 * e.trainable_params / e.total_params:.3g}%",
                         *(round(x / 1e9, 1) for x in sizes)])  # fmt: skip
        ratio = full.total / 1e9 / note
        group = "full fine-tuning memory: the note's order of magnitude (factor 2)"
        checks.append(rules.check(group, f"{model}: estimate / note's {note:g} GB", "noise-free, above 0.5",
                                  [ratio], 0.5, False, exact=True, unit="x"))  # fmt: skip
        checks.append(rules.check(group, f"{model}: estimate / note's {note:g} GB ", "noise-free, below 2",
                                  [ratio], 2.0, True, exact=True, unit="x"))  # fmt: skip
        checks.append(rules.check("LoRA needs < 1/3 of full fine-tuning's memory", f"{model}: LoRA / full",
                                  "noise-free, below 1/3", [lora.total / full.total], 1 / 3, True, exact=True,
                                  unit="x"))  # fmt: skip
        values[model] = (full.total / 1e9, lora.total / 1e9)
    table = Table("memory estimate per GPU, bf16 autocast, AdamW, batch 1 x 2048 tokens (GB = 1e9 bytes)",
                  ["model", "method", "trainable", "weights", "grads", "optimizer", "activations",
                   "activ. (ckpt)", "peak", "peak (ckpt)"], rows,
                  note="notelab.peft.estimate: fit's default path (float32 trained weights, gradients and AdamW "
                       "states: 16 bytes per trained parameter; what the compiled graph keeps; the chunked loss); "
                       "FSDP divides the model states, not the activations")  # fmt: skip
    return Section([table], [], {"gb": values}, checks)


def _method_config(method: str, r: int) -> Any:
    from notelab.peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, houlsby, pfeiffer

    return {
        "lora": lambda: LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear"),
        "ia3": IA3Config,
        "houlsby": lambda: houlsby(16),
        "pfeiffer": lambda: pfeiffer(16),
        "prefix": lambda: PrefixTuningConfig(num_virtual_tokens=8, encoder_hidden_size=64),
        "prompt": lambda: PromptTuningConfig(num_virtual_tokens=8),
    }[method]()


@dataclass
class Task:
    base: torch.nn.Module
    tokenizer: Any
    train: Any  # TensorDictDataset
    val: Any
    bleu_examples: list  # SFTExample


def pretrain_base(s: Settings, seed: int) -> Task:
    """A LLaMA pre-trained on the stdlib corpus, and the signature -> docstring data."""
    from notelab.lm import LlamaConfig
    from notelab.lm.data import sft_dataset, stdlib_sft_examples
    from notelab.lm.train import prepare_data, pretrain
    from notelab.train import TrainConfig

    data = prepare_data("stdlib", vocab_size=s.vocab, max_chars=s.max_chars)
    cfg = LlamaConfig(vocab_size=data.tokenizer.vocab_size, dim=s.dim, n_layers=s.n_layers, n_heads=4, n_kv_heads=2,
                      multiple_of=32, max_seq_len=2 * s.seq)  # fmt: skip
    tc = TrainConfig(steps=s.pre_steps, batch_size=s.batch, lr=3e-3, warmup_steps=min(20, s.pre_steps - 1),
                     seed=seed, progress=False, log_every=max(1, s.pre_steps))  # fmt: skip
    base = pretrain(cfg, data, None, tc, seq_len=s.seq).model
    if s.own_split:  # parsing the whole train split takes seconds: quick runs divide the val split's functions
        pool = stdlib_sft_examples("val", seed=0)
        val, train = pool[: s.n_val], pool[s.n_val :][: s.n_train]
    else:
        train, val = stdlib_sft_examples("train", s.n_train, seed=seed), stdlib_sft_examples("val", s.n_val, seed=0)
    tok = data.tokenizer
    return Task(base, tok, sft_dataset(tok, train, s.seq), sft_dataset(tok, val, s.seq), val[: s.n_bleu])


@torch.no_grad()
def val_loss(model: torch.nn.Module, val: Any) -> float:
    from notelab.lm.posttrain import sft_loss

    model.eval()
    return float(sft_loss(model, val.tensors)[0])


@torch.no_grad()
def greedy_bleu(model: torch.nn.Module, task: Task, n_tokens: int) -> float:
    """BLEU of greedy summaries, each by full recomputation (works for every method, prompt tuning too)."""
    import sacrebleu

    hyps, refs = [], []
    eos = task.tokenizer.eos_id
    for ex in task.bleu_examples:
        ids = torch.tensor([task.tokenizer.encode(ex.prompt, add_bos=task.tokenizer.bos_id is not None)])
        out: list[int] = []
        for _ in range(n_tokens):
            nxt = int(model(ids)[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
        hyps.append(task.tokenizer.decode(out))
        refs.append(ex.response)
    return sacrebleu.corpus_bleu(hyps, [refs]).score


def fine_tune(task: Task, method: str, r: int, steps: int, seed: int, data: Any = None) -> dict[str, Any]:
    """One fine-tuning run through ``notelab.train.fit``: its trainable fraction, val loss, time, memory."""
    from notelab.lm.posttrain import sft_loss
    from notelab.peft import count_parameters, get_peft_model
    from notelab.peft.estimate import MethodSpec, ModelShape, estimate
    from notelab.train import TrainConfig, fit

    seed_everything(seed)
    model = copy.deepcopy(task.base)
    if method == "full":
        model.requires_grad_(True)
    else:
        model = get_peft_model(model, _method_config(method, r))
    trainable, total = count_parameters(model)
    tc = TrainConfig(steps=steps, batch_size=16, lr=LR[method], warmup_steps=min(5, steps - 1), seed=seed,
                     progress=False, log_every=steps, compile=False)  # fmt: skip
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = fit(model, sft_loss, data if data is not None else task.train, tc).model
    seconds = time.perf_counter() - t0
    c = task.base.config
    shape = ModelShape(c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.hidden_dim)
    kind = {"houlsby": "adapter", "pfeiffer": "adapter"}.get(method, method)
    spec = MethodSpec(kind, r=max(r, 1), num_virtual_tokens=8, encoder_hidden_size=64, bottleneck=16)
    mem = torch.cuda.max_memory_allocated() if cuda else estimate(shape, spec, dtype="fp32", batch=16, seq=64).total
    return {"model": model, "fraction": trainable / total, "trainable": trainable, "seconds": seconds,
            "val": val_loss(model, task.val), "memory": mem, "measured": cuda}  # fmt: skip


def methods_section(s: Settings, task: Task, seed: int, out_dir: Path, progress: Progress) -> Section:
    """(2) every method on the docstring task; (the decided check) LoRA r=8 vs full over seeds."""
    base_val = val_loss(task.base, task.val)
    runs = [("full", 0)] + [("lora", r) for r in s.ranks] + [(m, 0) for m in ("houlsby", "pfeiffer", "prefix",
                                                                             "prompt", "ia3")]  # fmt: skip
    rows, points = [["base (no fine-tuning)", "0", "0", round(base_val, 3), "", "", ""]], []
    results: dict[str, dict[str, Any]] = {}
    for i, (method, r) in enumerate(runs):
        label = f"LoRA r={r}" if method == "lora" else method
        progress.step(i + 1, len(runs), label)
        res = fine_tune(task, method, r, s.ft_steps, seed)
        res["bleu"] = greedy_bleu(res.pop("model"), task, s.bleu_tokens)
        results[label] = res
        mem = f"{res['memory'] / 1e6:.1f} MB" + ("" if res["measured"] else " (est.)")
        rows.append([label, f"{res['trainable']:,}", f"{100 * res['fraction']:.3g}%", round(res["val"], 3),
                     round(res["bleu"], 2), round(res["seconds"], 1), mem])  # fmt: skip
        points.append((label, res["fraction"], res["val"]))
    ratios = []
    for k in range(s.seeds):  # the decided check: LoRA r=8's share of full fine-tuning's gain, per seed
        sk = seed + 1000 * k
        full = results["full"]["val"] if k == 0 else fine_tune(task, "full", 0, s.ft_steps, sk)["val"]
        lora_k = results.get("LoRA r=8", {}).get("val") if k == 0 else None
        lora = lora_k if lora_k is not None else fine_tune(task, "lora", 8, s.ft_steps, sk)["val"]
        ratios.append((base_val - lora) / (base_val - full) if base_val != full else math.nan)
    check = rules.check("LoRA comes close to full fine-tuning", "LoRA r=8: share of full fine-tuning's val-loss gain",
                        "95% t-interval above 0.5", [x for x in ratios if math.isfinite(x)], 0.5, False,
                        unit="x")  # fmt: skip
    table = Table(f"stdlib signature -> docstring, {s.ft_steps} fine-tuning steps each (batch 16)",
                  ["method", "trainable params", "trainable", "val loss", "BLEU", "seconds", "peak memory"], rows,
                  note=f"base: a {s.n_layers}-layer, width-{s.dim} LLaMA pre-trained {s.pre_steps} steps on the stdlib "
                       "corpus; memory measured on CUDA, else the estimator's figure for this model (fp32, batch 16 x "
                       "64)")  # fmt: skip
    fig = _figure(points, base_val, out_dir / "peft_quality_vs_params.png")
    return Section([table], [Figure("validation loss vs trainable parameters", fig.name,
                                    "each method after the same number of steps; lower is better")],
                   {"base_val": base_val, "results": results, "ratios": ratios}, [check])  # fmt: skip


def low_data_section(s: Settings, task: Task, seed: int) -> Section:
    """(3) 100 examples: full fine-tuning minus prefix tuning, validation loss, per seed."""
    from notelab.lm.data import TensorDictDataset

    small = TensorDictDataset({k: v[: s.low_data] for k, v in task.train.tensors.items()})
    diffs, rows = [], []
    for k in range(s.seeds):
        sk = seed + 1000 * k
        full = fine_tune(task, "full", 0, s.low_steps, sk, small)["val"]
        prefix = fine_tune(task, "prefix", 0, s.low_steps, sk, small)["val"]
        diffs.append(full - prefix)
        rows.append([sk, round(full, 3), round(prefix, 3)])
    check = rules.check("prefix tuning beats fine-tuning with little data (Li & Liang, sec. 6.3)",
                        f"{s.low_data} examples: val loss full - prefix", "95% t-interval above 0", diffs, 0.0, False,
                        role="cannot refute")  # fmt: skip
    columns = ["seed", "full val loss", "prefix val loss"]
    table = Table(f"low data: {s.low_data} training examples, {s.low_steps} steps", columns, rows)
    return Section([table], [], {"diffs": diffs}, [check])


def _figure(points: list[tuple[str, float, float]], base_val: float, path: Path) -> Path:
    from matplotlib.figure import Figure as MplFigure  # the object API: no global pyplot state

    fig = MplFigure(figsize=(6, 4))
    ax = fig.add_subplot()
    for label, frac, val in points:
        ax.scatter(100 * frac, val)
        ax.annotate(label, (100 * frac, val), fontsize=8)
    ax.axhline(base_val, ls="--", c="gray", label="base model")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (%)")
    ax.set_ylabel("validation loss (docstring tokens)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def run(
    out_dir: Path, quick: bool = False, seed: int = 0, tiny: bool = False, progress: Progress | None = None
) -> ClaimResult:
    """Run the three measurements; ``quick`` for ``make demo``, ``tiny`` for tests (numbers meaningless)."""
    out_dir, progress, t0 = begin(out_dir, seed, progress)
    s = TINY if tiny else QUICK if quick else FULL
    with progress.part("(1) memory estimates"):
        est = estimator_section()
    with one_thread():
        with progress.part(f"(2) stdlib docstring task: pre-training {s.pre_steps} steps, then each method"):
            task = pretrain_base(s, seed)
            meth = methods_section(s, task, seed, out_dir, progress)
        with progress.part(f"(3) low data, {s.low_data} examples"):
            low = low_data_section(s, task, seed)
    sections = (est, meth, low)
    checks = [c for sec in sections for c in sec.checks]
    gb = est.values["gb"]
    res = meth.values["results"]
    summary = (
        f"Estimated full fine-tuning in bf16 with AdamW: Qwen1.5-7B {gb['qwen1.5-7b'][0]:.0f} GB (note: 160), "
        f"72B {gb['qwen1.5-72b'][0]:.0f} GB (note: 1,600); with LoRA r=16 {gb['qwen1.5-7b'][1]:.0f} / "
        f"{gb['qwen1.5-72b'][1]:.0f} GB. On the docstring task the base's val loss {meth.values['base_val']:.3f} "
        f"fell to {res['full']['val']:.3f} with full fine-tuning and "
        + ", ".join(f"{k} {v['val']:.3f} ({100 * v['fraction']:.2g}% trained)" for k, v in res.items() if k != "full")
        + f". Group verdicts: {rules.group_verdicts(checks)}."
    )
    return ClaimResult.from_sections(
        NAME, TITLE, CLAIM, sections, summary=summary, t_start=t0, progress=progress,
        settings={"mode": "tiny" if tiny else "quick" if quick else "full", "seed": seed, **s.__dict__},
        paper=[PaperNumber("memory of full fine-tuning, Qwen1.5-7B / 72B", "~160 GB / ~1,600 GB", "the note",
                           f"estimated {gb['qwen1.5-7b'][0]:.0f} GB / {gb['qwen1.5-72b'][0]:.0f} GB (batch 1 x 2048)")],
    )  # fmt: skip
