"""Claim: a language model states facts it was never shown correctly (extrinsic hallucination), and this
can be detected (token uncertainty, SelfCheckGPT sampling consistency, FActScore-style retrieval) and
reduced (factual-nucleus sampling, retrieval).

The note's numbers: SelfCheckGPT (Manakul et al. 2023, Table 2) detects non-factual sentences with
AUC-PR 92.5 (NLI) and 93.4 (prompted LLM) against a random baseline of 73.0 (the positive rate);
factual-nucleus sampling (Lee et al. 2022) trades diversity for factuality; retrieval grounds answers.

Here, on a model whose training data we know exactly: a LLaMA (``notelab.lm``) pre-trained by
``notelab.train.fit`` on a corpus of Python standard-library modules, asked stdlib-facts about the
functions of those same modules (:mod:`notelab.hallucination.stdlib_facts`: parameters, literal
defaults, module; each answer labelled correct or hallucinated by a checker, no human):

1. hallucination rate of greedy answers (reported, per kind).
2. detection: each detector's AUC-PR at telling hallucinated answers from correct ones, against the
   random baseline (the positive rate; SelfCheckGPT's table: detectors x AUC-PR). The facts are cut into
   ``folds`` disjoint folds and the per-fold gap AUC-PR - E[AUC-PR of a random ranking] is the sample
   (:func:`random_auc_pr`: exact, where the positive rate would flatter small folds); Max(-log p), chosen
   before any run, decides (interval above 0), the others are reported. Detectors: Avg / Max(-log p) and Avg(H) of the
   answer's tokens (no sampling), SelfCheck unigram Avg / Max over ``n_samples`` samples at temperature
   1, FActScore-style support of the answer in the stdlib knowledge source (BM25 + lexical overlap).
3. factual-nucleus sampling (p, lambda, omega) against nucleus sampling (p) with the same seeds:
   the paired per-fact change of the hallucination rate has its interval below 0 (holds); distinct-2
   of the samples is reported beside it (the diversity it costs).
4. retrieval: greedy answers with the top BM25 passage of the knowledge source above the prompt
   against without: paired per-fact change below 0.
5. TruthfulQA MC1 / MC2 of the same model when ``<data_root>/truthfulqa`` exists, against the chance
   levels (reported: a model of the stdlib has no English world knowledge to speak of).
6. HaluEval general (``<data_root>/halueval``) scored by the detectors that need no sampling (reported).

The claim holds when (2), (3) and (4) hold; "does not hold" when one does not. Budgets: ``QUICK`` (CPU,
one thread, seconds: a small model on ~200 KB of source), ``FULL`` (CPU), ``FULL_GPU`` (the full run when
CUDA is present: a 69.6M-parameter model, 1,000 steps of 32 x 512 tokens on the whole train split, bf16 +
compile through ``fit``; 164 s on an H200).
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from notelab.core.errors import DataError, NotelabError
from notelab.core.runtime import get_device
from notelab.data.retrieval import BM25Index
from notelab.data.text import read_texts, stdlib_files
from notelab.eval.ranking import auc_pr, auc_roc
from notelab.hallucination import bench
from notelab.hallucination.detectors import DetectorScores, TokenUncertainty, token_uncertainty
from notelab.hallucination.factscore import LexicalSupport, check_facts
from notelab.hallucination.halueval import evaluate_detector, load_halueval
from notelab.hallucination.selfcheck import selfcheck_ngram
from notelab.hallucination.stdlib_facts import Fact, module_texts, stdlib_facts, stdlib_modules, write_knowledge
from notelab.hallucination.truthfulqa import QA_PRIMER, load_truthfulqa, score_truthfulqa
from notelab.lm.config import LlamaConfig
from notelab.lm.data import encode_stream, train_tokenizer
from notelab.lm.flops import count_parameters
from notelab.lm.sampling import FactualNucleus
from notelab.lm.train import LMData, mean_nll, pretrain
from notelab.reproduce import rules
from notelab.reproduce.base import ClaimResult, Figure, PaperNumber, Progress, Section, Table, begin, one_thread
from notelab.train import TrainConfig

NAME = "hallucination"
TITLE = "LLM hallucination: detection (token uncertainty, SelfCheck, FActScore) and mitigation"
CLAIM = (
    "A language model asked about facts states wrong ones (extrinsic hallucination); its own uncertainty, "
    "the consistency of its samples and retrieval-backed fact checking detect them better than chance, and "
    "factual-nucleus sampling and retrieval make them rarer."
)
DETECT, NUCLEUS, RETRIEVAL = "(2) detection", "(3) factual-nucleus sampling", "(4) retrieval"
# The detector that decides (2): SelfCheckGPT's strongest grey-box baseline (Table 2), needing no samples.
PRIMARY = "Max(-log p)"
DEFAULT_DATA_ROOT = Path("..") / "shared" / "data"  # the claim's default only (relative to the cwd)


@dataclass
class Settings:
    corpus_chars: int | None  # source characters of the modules trained on (None: the whole train split)
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    seq_len: int
    batch_size: int
    steps: int
    lr: float
    n_facts: int | None = None  # questions asked (None: every fact of the corpus's modules)
    # "module" is left out: its prompt (">>> f.__module__") is a pattern the stdlib source never shows, so
    # every model of this corpus fails it, and a kind that is always wrong would let a detector score by kind.
    kinds: tuple[str, ...] = ("params", "default")
    max_new_tokens: int = 24
    n_samples: int = 4  # samples per question for SelfCheck and for the sampling comparison
    top_p: float = 0.9  # nucleus sampling, and factual-nucleus sampling's p
    decay: float = 0.9  # factual-nucleus lambda
    floor: float = 0.3  # factual-nucleus omega
    folds: int = 4  # disjoint folds of the facts: the sample of the detection checks
    rag_k: int = 1  # passages above a retrieval-augmented prompt
    truthfulqa_n: int | None = 40  # questions (None: all)
    halueval_n: int | None = 40  # rows (None: all)
    truthfulqa_primer: bool = False  # the paper's six-shot QA primer (needs a context of a few hundred tokens)
    halueval_chars: int = 300  # query and response cut to this many characters (the model's context)


# QUICK trains ~8 passes over a small corpus: with fewer, more often seen modules, the model gets some facts
# right in seconds (on 300 KB it got 98% wrong: no mix of labels to detect). About 30 facts a seed.
QUICK = Settings(
    corpus_chars=80_000,
    vocab_size=1024,
    dim=96,
    n_layers=2,
    n_heads=4,
    seq_len=96,
    batch_size=16,
    steps=150,
    lr=4e-3,
    folds=3,
)
FULL = dataclasses.replace(
    QUICK, corpus_chars=1_500_000, vocab_size=2048, dim=256, n_layers=4, steps=1500, lr=2e-3, n_facts=400,
    n_samples=6, folds=8, truthfulqa_n=200, halueval_n=400,
)  # fmt: skip
FULL_GPU = dataclasses.replace(
    FULL, corpus_chars=None, vocab_size=8192, dim=640, n_layers=12, n_heads=10, seq_len=512, batch_size=32,
    steps=1000, lr=6e-4, n_facts=800, n_samples=6, folds=10, truthfulqa_n=None, halueval_n=2000,
    halueval_chars=600, max_new_tokens=32, truthfulqa_primer=True,
)  # fmt: skip
PAPER = [
    PaperNumber(
        "AUC-PR of detecting non-factual sentences: SelfCheckGPT-NLI / -Prompt vs random (GPT-3 WikiBio passages)",
        "92.50 / 93.42 vs 72.96",
        "Manakul et al. 2023 (SelfCheckGPT), Table 2, as quoted in the note",
        "",
    ),
]


# ---------------------------------------------------------------------------------------------
# Decision rules (pure: measurements in, checks out)


def random_auc_pr(n: int, positives: int) -> float:
    """The expected AUC-PR (average precision) of a random ranking of ``n`` items, ``positives`` of them positive.

    With ``P`` positives among ``N``, rank ``r`` is positive with probability ``P / N`` and then holds
    ``1 + (r - 1)(P - 1)/(N - 1)`` positives in the top ``r`` on average, so::

        E[AP] = (1/P) sum_r (P/N) (1 + (r - 1)(P - 1)/(N - 1)) / r = (H_N + (P - 1)/(N - 1) (N - H_N)) / N

    (``H_N`` the N-th harmonic number). It tends to the positive rate ``P / N`` for large ``N`` (SelfCheckGPT's
    "random" baseline) but is above it on small folds, where the positive rate would flatter any detector.
    """
    if not 1 <= positives <= n:
        raise ValueError(f"random_auc_pr: expected 1 <= positives <= n, got {positives} of {n}")
    h = sum(1.0 / r for r in range(1, n + 1))
    return 1.0 if n == 1 else (h + (positives - 1) / (n - 1) * (n - h)) / n


def fold_gaps(labels: Sequence[bool], scores: Sequence[float], folds: int) -> list[float]:
    """AUC-PR minus a random ranking's expected AUC-PR on each of ``folds`` disjoint folds (item ``i`` in fold
    ``i % folds``); unscored (NaN) items are left out, and a fold without both classes gives no value."""
    gaps = []
    for k in range(folds):
        pairs = [(y, s) for i, (y, s) in enumerate(zip(labels, scores)) if i % folds == k and s == s]
        ys = [y for y, _ in pairs]
        if len(set(ys)) == 2:
            gaps.append(auc_pr(ys, [s for _, s in pairs]) - random_auc_pr(len(ys), sum(ys)))
    return gaps


def detection_checks(gaps: dict[str, list[float]], primary: str = PRIMARY) -> list[rules.Check]:
    """The ``primary`` detector decides (chosen before any run, so that trying six detectors does not give six
    chances to pass by luck); the others are reported with their intervals."""
    return [
        rules.check(
            DETECT,
            f"{name}: AUC-PR - random ranking's, per fold",
            "t interval over disjoint folds of the facts above 0 (better than a random ranking)"
            + ("" if name == primary else "; reported (the decision is the primary detector's)"),
            values,
            0.0,
            below=False,
            role="decides" if name == primary else "reported",
            scale=100,
            unit=" pts",
        )
        for name, values in gaps.items()
    ]


def paired_rate_check(group: str, name: str, treated: Sequence[float], base: Sequence[float]) -> rules.Check:
    """Per fact: hallucination rate with the mitigation minus without; the claim: below 0."""
    return rules.check(
        group,
        name,
        "paired per fact, interval below 0 (fewer hallucinated answers)",
        [a - b for a, b in zip(treated, base)],
        0.0,
        below=True,
        scale=100,
        unit=" pts",
    )


# ---------------------------------------------------------------------------------------------
# The model


def corpus(s: Settings, seed: int) -> tuple[list, LMData]:
    """The modules trained on (a seeded random choice of ``corpus_chars`` characters of whole train-split
    files that define functions to ask about, or the whole train split) and their tokens; validation text
    from the stdlib's val split."""
    # a small corpus of modules that all define something to ask about; the full one is the whole split
    modules = stdlib_modules("train", s.corpus_chars, seed=seed, with_functions=s.corpus_chars is not None)
    texts = module_texts(modules)
    tokenizer = train_tokenizer(texts, s.vocab_size)
    val_chars = max(20_000, (s.corpus_chars or 10_000_000) // 10)
    val = list(read_texts(stdlib_files("val"), val_chars))
    source = {"data": "stdlib-modules", "max_chars": s.corpus_chars, "vocab_size": s.vocab_size}
    return modules, LMData(tokenizer, encode_stream(tokenizer, texts), encode_stream(tokenizer, val), source)


def context_of(s: Settings) -> int:
    return max(s.seq_len, 256)


def fitting_facts(facts: list[Fact], index: BM25Index, tokenizer: object, s: Settings) -> tuple[list[Fact], int]:
    """The first ``n_facts`` facts whose longest prompt (with its retrieved passages) leaves room for
    ``max_new_tokens`` in the model's context, and how many were passed over for that."""
    room = context_of(s) - s.max_new_tokens
    kept, dropped = [], 0
    for f, prompt in zip(facts, bench.retrieval_prompts(index, facts, s.rag_k)):
        if s.n_facts is not None and len(kept) >= s.n_facts:
            break
        if len(tokenizer.encode(prompt, add_bos=True)) <= room:
            kept.append(f)
        else:
            dropped += 1
    return kept, dropped


def train_model(s: Settings, data: LMData, seed: int, device: torch.device) -> torch.nn.Module:
    config = LlamaConfig(
        vocab_size=data.tokenizer.vocab_size,
        dim=s.dim,
        n_layers=s.n_layers,
        n_heads=s.n_heads,
        multiple_of=16,
        max_seq_len=context_of(s),
    )
    train_config = TrainConfig(
        steps=s.steps,
        batch_size=s.batch_size,
        lr=s.lr,
        warmup_steps=max(1, s.steps // 20),
        min_lr_ratio=0.1,
        weight_decay=0.1,
        betas=(0.9, 0.95),
        device=str(device),
        seed=seed,
        log_every=max(1, s.steps // 10),
        progress=False,
    )
    return pretrain(config, data, None, train_config, seq_len=s.seq_len).model.eval()


def language_model(model: torch.nn.Module, tokenizer: object) -> object:
    from notelab.hallucination.backends import NotelabLM

    # The reference decode path: the answers come in batches of many shapes (prompt lengths, n samples), and the
    # engine builds (compiles, captures) a new static graph per shape, which costs more than these short answers.
    return NotelabLM(model, tokenizer, name="stdlib-llama", path="reference")


# ---------------------------------------------------------------------------------------------
# Sections


def facts_section(lm: object, facts: list[Fact], s: Settings) -> Section:
    """(1) greedy answers and their labels."""
    answers = bench.answer_facts(lm, facts, max_new_tokens=s.max_new_tokens)
    labels = bench.wrong(facts, answers)
    r = bench.rates(facts, labels)
    rows = [[kind, r.n_by_kind[kind], f"{100 * rate:.1f}%"] for kind, rate in r.by_kind.items()]
    rows.append(["all", r.n, f"{100 * r.overall:.1f}%"])
    examples = [
        [f.kind, f"{f.module}.{f.name}" + (f" ({f.param})" if f.param else ""), f.answer, a[0], "yes" if w[0] else "no"]
        for f, a, w in list(zip(facts, answers, labels))[:8]
    ]
    check = rules.check(
        "(1) hallucination rate",
        "greedy answers that do not state the fact",
        "reported: the rate with its interval over facts",
        [float(w[0]) for w in labels],
        0.0,
        below=False,
        role="reported",
        scale=100,
        unit="%",
    )
    tables = [
        Table("(1) Hallucination rate of greedy answers on stdlib-facts", ["kind", "questions", "hallucinated"], rows,
              note="A fact is hallucinated when the checker does not find it in the answer (wrong, missing or "
              "unparsable); the model was trained on every module asked about."),
        Table("(1) Examples", ["kind", "function", "truth", "answer", "hallucinated"], examples),
    ]  # fmt: skip
    values = {"answers": [a[0] for a in answers], "labels": [w[0] for w in labels], "rate": r.overall,
              "by_kind": r.by_kind}  # fmt: skip
    return Section(tables, [], values, [check])


def _fact_statement(f: Fact, answer: str) -> str:
    """The answer as a statement FActScore can check against the knowledge source."""
    if f.kind == "params":
        return f"{f.module}.{f.name}: def {f.name}({answer})"
    if f.kind == "default":
        return f"{f.module}.{f.name}: def {f.name}({f.param}={answer})"
    return f"{answer}.{f.name}"


def detector_scores(
    lm: object, facts: list[Fact], answers: list[str], index: BM25Index, s: Settings, seed: int
) -> dict[str, list[float]]:
    """Each detector's score per fact (NaN where it could not score: e.g. an empty answer)."""
    nan = float("nan")
    out: dict[str, list[float]] = {}
    unc = token_uncertainty(lm, [f.prompt for f in facts], answers)
    for label, pick in (("Avg(-log p)", "mean_nll"), ("Max(-log p)", "max_nll"), ("Avg(H)", "entropy")):
        vals = []
        for u in unc:
            d = getattr(u, pick)
            vals.append(nan if d is None or d.failed else d.passage_score)
        out[label] = vals
    samples = bench.answer_facts(lm, facts, n=s.n_samples, temperature=1.0, top_p=1.0, max_new_tokens=s.max_new_tokens)
    avg, mx = [], []
    for a, smp in zip(answers, samples):
        try:
            ng = selfcheck_ngram(a, smp, sentences=[a])
        except NotelabError:  # e.g. an empty answer: recorded as unscored, the run goes on
            avg.append(nan)
            mx.append(nan)
            continue
        avg.append(ng.avg.passage_score)
        mx.append(ng.max.passage_score)
    out["SelfCheck unigram Avg"], out["SelfCheck unigram Max"] = avg, mx
    checks = check_facts(
        [_fact_statement(f, a) if a.strip() else "" for f, a in zip(facts, answers)],
        LexicalSupport(),
        retriever=index.search,
        k=s.rag_k,
        gamma=None,
        topics=[f"{f.module}.{f.name}" for f in facts],
    )
    out["FActScore (BM25 + lexical)"] = [nan if c.failed else c.detector.passage_score for c in checks]
    return out


def pr_vs_random(labels: Sequence[bool], scores: Sequence[float]) -> tuple[int, float, float, float] | None:
    """(items scored, AUC-PR, positive rate, AUC-ROC) over the scored (non-NaN) items; None without both classes."""
    pairs = [(y, v) for y, v in zip(labels, scores) if v == v]
    ys, vs = [y for y, _ in pairs], [v for _, v in pairs]
    if len(set(ys)) < 2:
        return None
    return len(ys), auc_pr(ys, vs), sum(ys) / len(ys), auc_roc(ys, vs)


def detection_section(lm: object, facts: list[Fact], first: Section, index: BM25Index, s: Settings,
                      seed: int, out_dir: Path) -> Section:  # fmt: skip
    """(2) AUC-PR / AUC-ROC of each detector against the labels of (1)."""
    labels, answers = first.values["labels"], first.values["answers"]
    scores = detector_scores(lm, facts, answers, index, s, seed)
    kinds = [k for k in s.kinds if any(f.kind == k for f in facts)]
    rows, gaps = [], {}
    for name, vals in scores.items():
        overall = pr_vs_random(labels, vals)
        if overall is None:
            rows.append([name, sum(v == v for v in vals), "-", "-", "-", *["-"] * len(kinds)])
            continue
        n, pr, rate, roc = overall
        within = [pr_vs_random([y for f, y in zip(facts, labels) if f.kind == k],
                               [v for f, v in zip(facts, vals) if f.kind == k]) for k in kinds]  # fmt: skip
        rows.append([name, n, f"{100 * pr:.1f}", f"{100 * rate:.1f}", f"{100 * roc:.1f}",
                     *["-" if w is None else f"{100 * w[1]:.1f} / {100 * w[2]:.1f}" for w in within]])  # fmt: skip
        gaps[name] = fold_gaps(labels, vals, s.folds)
    table = Table(
        "(2) Detecting hallucinated answers (the shape of SelfCheckGPT's Table 2)",
        [
            "detector",
            "scored",
            "AUC-PR",
            "random (positive rate)",
            "AUC-ROC",
            *[f"AUC-PR / random within {k}" for k in kinds],
        ],  # fmt: skip
        rows,
        note=f"Scores: higher = more likely hallucinated. SelfCheck over {s.n_samples} samples at temperature 1; "
        f"FActScore: the answer as a statement, top-{s.rag_k} BM25 passage of the stdlib knowledge source, "
        "supported when 80% of its content words are in the evidence (no LM judge). Empty answers are "
        "hallucinated but cannot be scored: left out of that detector's row. The kinds differ in difficulty "
        "(parameter lists are missed more often than defaults), so part of a detector's ranking may come from "
        "telling the kinds apart: the last columns rank within one kind only. The checks compare each fold's "
        "AUC-PR with a random ranking's expected AUC-PR (exact for the fold's size; above the positive rate on "
        f"small folds), over {s.folds} disjoint folds of the facts.",
    )
    bars = {r[0]: (float(r[2]), float(r[3])) for r in rows if r[2] != "-"}
    figures = []
    if bars:
        _plot_detectors(out_dir / "detectors_auc_pr.png", bars)
        caption = "AUC-PR of each detector (bars) and the random baseline, the positive rate (line)."
        figures.append(Figure("Detectors vs random", "detectors_auc_pr.png", caption))
    return Section([table], figures, {"scores": scores, "gaps": gaps}, detection_checks(gaps))


def _plot_detectors(path: Path, bars: dict[str, tuple[float, float]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    names = list(bars)
    ax.barh(names, [bars[n][0] for n in names], color="#4c72b0")
    ax.axvline(next(iter(bars.values()))[1], color="#c44e52", linestyle="--", label="random (positive rate)")
    ax.set_xlabel("AUC-PR (%)")
    ax.set_xlim(0, 100)
    ax.invert_yaxis()
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def mitigation_sections(
    lm: object, tokenizer: object, facts: list[Fact], first: Section, index: BM25Index, s: Settings
) -> tuple[Section, Section]:
    """(3) factual-nucleus vs nucleus sampling; (4) retrieval-augmented greedy answers vs plain ones."""
    nucleus = bench.answer_facts(lm, facts, n=s.n_samples, temperature=1.0, top_p=s.top_p,
                                 max_new_tokens=s.max_new_tokens)  # fmt: skip
    schedule = FactualNucleus.for_tokenizer(tokenizer, p=s.top_p, decay=s.decay, floor=s.floor)
    factual = bench.answer_facts(lm, facts, n=s.n_samples, temperature=1.0, top_p=schedule,
                                 max_new_tokens=s.max_new_tokens)  # fmt: skip

    def per_fact(answers: list[list[str]]) -> list[float]:
        return [sum(row) / len(row) for row in bench.wrong(facts, answers)]

    rate_n, rate_f = per_fact(nucleus), per_fact(factual)
    div_n, div_f = bench.mean_distinct_n(nucleus, 2), bench.mean_distinct_n(factual, 2)
    nucleus_table = Table(
        "(3) Factual-nucleus sampling against nucleus sampling",
        ["sampler", "hallucination rate", "distinct-2 of samples"],
        [
            [f"nucleus p={s.top_p}", f"{100 * statistics.fmean(rate_n):.1f}%", f"{div_n:.3f}"],
            [
                f"factual-nucleus p={s.top_p}, lambda={s.decay}, omega={s.floor}",
                f"{100 * statistics.fmean(rate_f):.1f}%",
                f"{div_f:.3f}",
            ],
            ["greedy (1)", f"{100 * first.values['rate']:.1f}%", "-"],
        ],  # fmt: skip
        note=f"{s.n_samples} samples per question at temperature 1; sentence ends for the reset: tokens ending "
        "in '.', '!', '?' or a newline. distinct-2: distinct token bigrams / all bigrams of one question's "
        "samples, averaged over questions (Li et al. 2016).",
    )
    nucleus_check = paired_rate_check(NUCLEUS, "hallucination rate factual-nucleus - nucleus", rate_f, rate_n)
    diversity = rules.check(
        NUCLEUS,
        "distinct-2 factual-nucleus - nucleus",
        "reported: the diversity factual-nucleus sampling gives up",
        [bench.distinct_n(a, 2) - bench.distinct_n(b, 2) for a, b in zip(factual, nucleus)],
        0.0,
        below=True,
        role="reported",
    )
    rag_prompts = bench.retrieval_prompts(index, facts, s.rag_k)
    rag = bench.answer_facts(lm, facts, max_new_tokens=s.max_new_tokens, prompts=rag_prompts)
    rate_r = [float(w[0]) for w in bench.wrong(facts, rag)]
    rate_g = [float(w) for w in first.values["labels"]]
    hit = sum(f"{f.name}" in p.split("\n# ", 1)[0] for f, p in zip(facts, rag_prompts)) / len(facts)
    retrieval_table = Table(
        "(4) Retrieval-augmented answers against plain ones (greedy)",
        ["prompt", "hallucination rate"],
        [["plain (1)", f"{100 * statistics.fmean(rate_g):.1f}%"],
         [f"top-{s.rag_k} BM25 passage above the prompt", f"{100 * statistics.fmean(rate_r):.1f}%"]],
        note=f"Query: the question in words (it names the function, never the answer); the top passage names "
        f"the asked function for {100 * hit:.0f}% of the questions.",
    )  # fmt: skip
    retrieval_check = paired_rate_check(RETRIEVAL, "hallucination rate with retrieval - without", rate_r, rate_g)
    values_n = {"rate_nucleus": statistics.fmean(rate_n), "rate_factual": statistics.fmean(rate_f),
                "distinct2_nucleus": div_n, "distinct2_factual": div_f}  # fmt: skip
    values_r = {"rate_rag": statistics.fmean(rate_r), "rate_plain": statistics.fmean(rate_g), "hit": hit}
    return (
        Section([nucleus_table], [], values_n, [nucleus_check, diversity]),
        Section([retrieval_table], [], values_r, [retrieval_check]),
    )


def truthfulqa_section(lm: object, root: Path, s: Settings) -> Section:
    """(5) MC1 / MC2 (with the paper's QA primer when the budget's context has room), against chance."""
    questions = load_truthfulqa(root)[: s.truthfulqa_n]
    result = score_truthfulqa(lm, questions, primer=QA_PRIMER if s.truthfulqa_primer else "")
    chance1 = statistics.fmean(1 / len(q.mc1) for q in questions)
    chance2 = statistics.fmean(sum(t for _, t in q.mc2) / len(q.mc2) for q in questions)
    table = Table(
        "(5) TruthfulQA multiple choice (log-likelihood)",
        ["questions", "MC1", "MC1 chance", "MC2", "MC2 uniform"],
        [[result.n, f"{result.mc1:.3f}", f"{chance1:.3f}", f"{result.mc2:.3f}", f"{chance2:.3f}"]],
        note=(
            "The paper's six-shot QA primer, then 'Q: ...\\nA:'. "
            if s.truthfulqa_primer
            else "Prompt 'Q: ...\\nA:' without the paper's six-shot primer (it does not fit a small model's context). "
        )
        + "The paper's best model was truthful on 58% of questions, humans on 94% (generation, not MC).",
    )
    return Section([table], [], {"mc1": result.mc1, "mc2": result.mc2, "n": result.n})


def _uncertainty_by_item(lm: object, prompts: list[str], passages: list[str], chunk: int = 32) -> list:
    """``token_uncertainty`` in chunks; a chunk the backend refuses (e.g. one item longer than the context) is
    scored item by item, and an item it still refuses is recorded as that item's failure."""
    out = []
    for start in range(0, len(prompts), chunk):
        p, c = prompts[start : start + chunk], passages[start : start + chunk]
        try:
            out += token_uncertainty(lm, p, c)
            continue
        except NotelabError:
            pass
        for one_p, one_c in zip(p, c):
            try:
                out += token_uncertainty(lm, [one_p], [one_c])
            except NotelabError as e:
                out.append(_failed(str(e)))
    return out


def _failed(reason: str) -> TokenUncertainty:
    f = DetectorScores.failure(reason)
    return TokenUncertainty(f, f, f)


def halueval_section(lm: object, path: Path, s: Settings) -> Section:
    """(6) HaluEval general scored by token uncertainty (no sampling)."""
    items = load_halueval(path, limit=s.halueval_n)
    c = s.halueval_chars
    items = [dataclasses.replace(i, prompt=i.prompt[:c], response=i.response[:c]) for i in items]
    unc = _uncertainty_by_item(lm, [i.prompt + "\n" for i in items], [i.response for i in items])
    rows = []
    for label, pick in (("Avg(-log p)", "mean_nll"), ("Max(-log p)", "max_nll"), ("Avg(H)", "entropy")):
        by_id = {i.id: getattr(u, pick) for i, u in zip(items, unc)}

        def score(item: object, by_id: dict = by_id) -> float:
            d = by_id[item.id]
            if d is None or d.failed:
                raise DataError(d.failed if d is not None else "no entropies from this backend")
            return d.passage_score

        try:
            r = evaluate_detector(items, score)
        except NotelabError as e:  # one class only or nothing scored: said in the table
            rows.append([label, 0, "-", "-", "-", str(e)[:80]])
            continue
        rows.append([label, r.n, f"{100 * r.auc_pr:.1f}", f"{100 * r.positive_rate:.1f}", f"{100 * r.auc_roc:.1f}",
                     f"{len(r.failed)} failed" if r.failed else ""])  # fmt: skip
    table = Table(
        "(6) HaluEval general: ChatGPT responses scored by this model's token uncertainty",
        ["detector", "scored", "AUC-PR", "random (positive rate)", "AUC-ROC", "note"],
        rows,
        note=f"First {len(items)} rows; query and response cut to {c} characters to fit the context (a "
        "hallucination past the cut is still labelled). A stdlib model knows little of the queries' world.",
    )
    return Section([table], [], {"rows": rows})


def _reported(title: str, section: Callable[..., Section], *args: object) -> Section:
    """A reported-only section; bad data there (a malformed file, a text longer than the context) becomes a
    table saying so instead of ending the run."""
    try:
        return section(*args)
    except NotelabError as e:
        return Section([Table(title, ["error"], [[str(e)]])], [], {"error": str(e)})


# ---------------------------------------------------------------------------------------------


def run(
    out_dir: Path,
    quick: bool = False,
    seed: int = 0,
    progress: Progress | None = None,
    settings: Settings | None = None,
    data_root: str | Path | None = None,
) -> ClaimResult:
    """The six parts for ``settings`` (default ``QUICK`` / ``FULL_GPU`` / ``FULL``); TruthfulQA and
    HaluEval read ``data_root`` (default ``../shared/data`` from the cwd) and are left out when absent."""
    out_dir, progress, t_start = begin(out_dir, seed, progress)
    s = settings or (QUICK if quick else FULL_GPU if torch.cuda.is_available() else FULL)
    root = Path(data_root) if data_root is not None else DEFAULT_DATA_ROOT
    device = get_device("auto")
    with one_thread(quick):
        with progress.part("corpus and tokenizer"):
            modules, data = corpus(s, seed)
            index = BM25Index.from_folder(write_knowledge(out_dir / "knowledge", modules=modules).parent)
            facts, dropped = fitting_facts(stdlib_facts(None, seed=seed, kinds=s.kinds, modules=modules), index,
                                           data.tokenizer, s)  # fmt: skip
        with progress.part(f"pre-train ({s.steps} steps)"):
            t0 = time.perf_counter()
            model = train_model(s, data, seed, device)
            train_seconds = time.perf_counter() - t0
            val = mean_nll(model, data.val, s.seq_len, max_windows=16)
        lm = language_model(model, data.tokenizer)
        with progress.part("(1) questions"):
            first = facts_section(lm, facts, s)
        with progress.part("(2) detectors"):
            detect = detection_section(lm, facts, first, index, s, seed, out_dir)
        with progress.part("(3) (4) mitigations"):
            nucleus, retrieval = mitigation_sections(lm, data.tokenizer, facts, first, index, s)
        extra = []
        if (root / "truthfulqa").is_dir():
            with progress.part("(5) TruthfulQA"):
                extra.append(_reported("(5) TruthfulQA", truthfulqa_section, lm, root / "truthfulqa", s))
        if (root / "halueval" / "general_data.json").is_file():
            with progress.part("(6) HaluEval"):
                extra.append(
                    _reported("(6) HaluEval", halueval_section, lm, root / "halueval" / "general_data.json", s)
                )
    sections = (first, detect, nucleus, retrieval, *extra)
    checks = [c for sec in sections for c in sec.checks]
    parts = rules.group_verdicts(checks)
    params = count_parameters(model.config)
    summary = _summary(first, detect, nucleus, retrieval, parts, params, len(facts), quick)
    settings_out = {
        "quick": quick, "seed": seed, "device": str(device), **dataclasses.asdict(s), "parameters": params,
        "modules": [m for _, m in modules], "train_tokens": data.train.numel(), "val_loss": val,
        "train_seconds": round(train_seconds, 1), "facts": len(facts), "facts_too_long": dropped, "verdicts": parts,
        "data_root": str(root), "truthfulqa": (root / "truthfulqa").is_dir(),
        "halueval": (root / "halueval").is_dir(),
    }  # fmt: skip
    return ClaimResult.from_sections(
        NAME, TITLE, CLAIM, sections, summary=summary, settings=settings_out, t_start=t_start, progress=progress,
        paper=[dataclasses.replace(PAPER[0], ours=_best_detector(detect))],
    )  # fmt: skip


def _best_detector(detect: Section) -> str:
    table = detect.tables[0]
    scored = [r for r in table.rows if r[2] != "-"]
    if not scored:
        return "no detector could be scored (one class only)"
    best = max(scored, key=lambda r: float(r[2]))
    return f"best here: {best[0]} {best[2]} vs random {best[3]} (stdlib-facts answers of a small LLaMA)"


def _summary(first: Section, detect: Section, nucleus: Section, retrieval: Section, parts: dict[str, str],
             params: int, n: int, quick: bool) -> str:  # fmt: skip
    f, nv, rv = first.values, nucleus.values, retrieval.values
    return (
        f"A {params / 1e6:.1f}M-parameter LLaMA trained on the modules asked about hallucinated "
        f"{100 * f['rate']:.0f}% of {n} greedy stdlib-facts answers. {DETECT} {parts.get(DETECT, 'inconclusive')}: "
        f"{_best_detector(detect)}. {NUCLEUS} {parts.get(NUCLEUS, 'inconclusive')}: hallucination rate "
        f"{100 * nv['rate_nucleus']:.0f}% -> {100 * nv['rate_factual']:.0f}%, distinct-2 "
        f"{nv['distinct2_nucleus']:.2f} -> {nv['distinct2_factual']:.2f}. {RETRIEVAL} "
        f"{parts.get(RETRIEVAL, 'inconclusive')}: {100 * rv['rate_plain']:.0f}% -> {100 * rv['rate_rag']:.0f}%."
        + (" Quick run: a small model trained for seconds; the full run is the one to quote." if quick else "")
    )
