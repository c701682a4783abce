"""``notelab hallucination detect|bench|serve-check``: parse, call notelab.hallucination, print.

    notelab hallucination detect --input rows.jsonl (--checkpoint RUN | --hf DIR | --base-url URL --model NAME)
        [--detectors uncertainty,ngram,prompt,factscore] [--knowledge DIR] [--samples N] --out scores.jsonl
    notelab hallucination bench --task stdlib-facts|truthfulqa|halueval (--checkpoint | --hf | --base-url)
        [--data PATH] [--n N] [--seed S] [--out report.json]
    notelab hallucination serve-check --base-url http://127.0.0.1:8000/v1 --model NAME [--checkpoint RUN]
        [--task ...]
    notelab hallucination knowledge --out DIR [--split all|train|val]    the stdlib knowledge source (JSONL)

``detect`` reads JSONL rows ``{"prompt", "response", "samples"?}`` (a malformed row is one error line naming
its line number) and writes one JSON line per row: each detector's passage score, sentence scores and, for an
item it could not score, why (``failed``). Detectors: ``uncertainty`` (Avg / Max -log p and Avg entropy of the
response's tokens), ``ngram`` (SelfCheck unigram over the samples), ``prompt`` (SelfCheck-Prompt with the same
model as judge), ``factscore`` (atomic facts checked against ``--knowledge`` by BM25 + lexical overlap).
Rows without samples get ``--samples`` drawn from the model at temperature 1 when a detector needs them.

``bench`` scores a model (a notelab run folder, a transformers folder, or an OpenAI-compatible endpoint) on
stdlib-facts (hallucination rate per kind), TruthfulQA (MC1 / MC2 from ``--data``: a folder, ``mc_task.json``
or ``TruthfulQA.csv``) or a HaluEval file (AUC-PR / AUC-ROC of token uncertainty). ``serve-check`` runs the
same through a running ``notelab lm serve`` and, given ``--checkpoint`` of the served model, first checks
that the server's greedy text and log-probabilities equal the in-process model's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from notelab.cli.common import add_model_options, check_out_file, check_positive
from notelab.core.errors import ConfigError, DataError, NotelabError

DETECTORS = ("uncertainty", "ngram", "prompt", "factscore")
TASKS = ("stdlib-facts", "truthfulqa", "halueval")


def _add_model_source(p: argparse.ArgumentParser, endpoint_required: bool = False) -> None:
    if endpoint_required:
        p.add_argument("--base-url", required=True, help="the server's API root, e.g. http://127.0.0.1:8000/v1")
        p.add_argument("--checkpoint", help="the served model's run folder: compare the server with it first")
    else:
        src = p.add_mutually_exclusive_group(required=True)
        src.add_argument("--checkpoint", help="a notelab run folder (model + tokenizer.json)")
        src.add_argument("--hf", help="a transformers causal-LM folder (local files only)")
        src.add_argument("--base-url", help="an OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1")
    p.add_argument("--model", help="the model name the endpoint serves (with --base-url)")
    p.add_argument("--chat", action="store_true", help="endpoint: generate through /v1/chat/completions")
    p.add_argument("--timeout", type=float, default=30.0, help="endpoint: seconds per attempt")
    p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0, help="seeds the samples")
    add_model_options(p)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("hallucination", help="hallucination detectors and benchmarks on local models")
    verbs = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    d = verbs.add_parser("detect", help="score JSONL rows {prompt, response, samples?} with detectors")
    d.add_argument("--input", required=True, help="JSONL rows {prompt, response, samples?}")
    d.add_argument("--detectors", default="uncertainty,ngram", help=f"comma-separated: {', '.join(DETECTORS)}")
    d.add_argument("--knowledge", help="a folder of .txt/.md/.jsonl for factscore")
    d.add_argument("--samples", type=int, default=4, help="samples drawn for rows that have none")
    d.add_argument("--max-new-tokens", type=int, default=64)
    d.add_argument("--out", required=True, help="the JSONL file to write")
    _add_model_source(d)
    d.set_defaults(func=detect)

    k = verbs.add_parser("knowledge", help="write the stdlib knowledge source (one passage per function) to a folder")
    k.add_argument("--out", required=True, help="the folder to write stdlib_knowledge.jsonl into")
    k.add_argument("--split", choices=("all", "train", "val"), default="all")
    k.set_defaults(func=knowledge)

    for name, helper, endpoint in (
        ("bench", "a benchmark against a model", False),
        ("serve-check", "a benchmark through a running notelab lm serve", True),
    ):
        b = verbs.add_parser(name, help=helper)
        b.add_argument("--task", choices=TASKS, default="stdlib-facts")
        b.add_argument("--data", help="truthfulqa: a folder / mc_task.json / TruthfulQA.csv; halueval: a JSON file")
        b.add_argument("--n", type=int, help="questions / rows to use (default: stdlib-facts 100, others all)")
        b.add_argument("--max-new-tokens", type=int, default=32)
        b.add_argument("--primer", choices=("qa", "none"), default="qa",
                       help="truthfulqa: the paper's six-shot QA primer, or none (short contexts)")  # fmt: skip
        b.add_argument("--out", help="write the report as JSON here")
        _add_model_source(b, endpoint_required=endpoint)
        b.set_defaults(func=bench if name == "bench" else serve_check)


# ---------------------------------------------------------------------------------------------- models


def _endpoint(args: argparse.Namespace) -> Any:  # noqa: ANN401
    from notelab.hallucination import OpenAICompatLM

    if not args.model:
        raise ConfigError("--base-url: expected --model NAME (the model the endpoint serves), got none")
    check_positive(timeout=args.timeout)
    return OpenAICompatLM(args.base_url, args.model, timeout=args.timeout, chat=args.chat, seed=args.seed)


def _local(args: argparse.Namespace) -> Any:  # noqa: ANN401
    from notelab.core.runtime import get_device
    from notelab.hallucination import NotelabLM, TransformersLM

    device = get_device(args.device)
    if args.checkpoint:
        if not Path(args.checkpoint).is_dir():
            raise DataError(f"--checkpoint: expected a run folder, got {args.checkpoint!r} (no such folder)")
        return NotelabLM.from_dir(args.checkpoint, device=device, allow_large=args.allow_large, seed=args.seed)
    return TransformersLM.from_dir(args.hf, device=device)


def _model(args: argparse.Namespace) -> Any:  # noqa: ANN401
    return _endpoint(args) if args.base_url else _local(args)


# ---------------------------------------------------------------------------------------------- detect


def read_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """JSONL rows ``{"prompt": str, "response": str, "samples": [str, ...]?}``; a bad row names its line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"--input: expected a JSONL file, got {str(path)!r} (no such file)")
    rows = []
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: expected a JSON object, got invalid JSON ({e.msg})") from e
            if not isinstance(obj, dict):
                raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            for key in ("prompt", "response"):
                if not isinstance(obj.get(key), str):
                    raise DataError(f"{where}: expected a string {key!r}, got {obj.get(key)!r:.40}")
            samples = obj.get("samples")
            if samples is not None and (not isinstance(samples, list) or not all(isinstance(s, str) for s in samples)):
                raise DataError(f"{where}: expected 'samples' as a list of strings, got {samples!r:.40}")
            rows.append({"prompt": obj["prompt"], "response": obj["response"], "samples": samples})
    if not rows:
        raise DataError(f"{path}: expected at least one JSON row, found none")
    return rows


def parse_detectors(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in DETECTORS]
    if bad or not names:
        raise ConfigError(f"--detectors: expected a comma-separated subset of {', '.join(DETECTORS)}, got {text!r}")
    return list(dict.fromkeys(names))


def _scores(d: Any) -> dict[str, Any]:  # noqa: ANN401
    """A DetectorScores as JSON (NaN -> null)."""

    def num(x: float) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else x

    if d is None:
        return {"failed": "not reported by this backend"}
    if d.failed:
        return {"failed": d.failed}
    return {"passage_score": num(d.passage_score), "sentences": d.sentences,
            "sentence_scores": [num(x) for x in d.sentence_scores]}  # fmt: skip


def run_detectors(
    lm: Any,  # noqa: ANN401
    rows: Sequence[dict[str, Any]],
    detectors: Sequence[str],
    knowledge: Any = None,  # noqa: ANN401 - a BM25Index for factscore
    n_samples: int = 4,
    max_new_tokens: int = 64,
) -> list[dict[str, Any]]:
    """Each row's detector results as JSON-ready dicts (a failed item says why; the batch goes on)."""
    from notelab.hallucination.detectors import DetectorScores, token_uncertainty
    from notelab.hallucination.factscore import LexicalSupport, check_facts
    from notelab.hallucination.selfcheck import selfcheck_ngram, selfcheck_prompt

    out: list[dict[str, Any]] = [{} for _ in rows]
    prompts, responses = [r["prompt"] for r in rows], [r["response"] for r in rows]
    if "uncertainty" in detectors:
        for o, u in zip(out, token_uncertainty(lm, prompts, responses)):
            o["avg_nll"], o["max_nll"], o["avg_entropy"] = _scores(u.mean_nll), _scores(u.max_nll), _scores(u.entropy)
    samples = [r["samples"] for r in rows]
    if {"ngram", "prompt"} & set(detectors):
        need = [i for i, s in enumerate(samples) if s is None]
        if need:
            drawn = lm.generate([prompts[i] for i in need], n=n_samples, temperature=1.0, max_new_tokens=max_new_tokens)
            for i, gens in zip(need, drawn):
                samples[i] = [g.text for g in gens]
    for i, (o, response) in enumerate(zip(out, responses)):
        if "ngram" in detectors:
            try:
                ng = selfcheck_ngram(response, samples[i])
                o["ngram_avg"], o["ngram_max"] = _scores(ng.avg), _scores(ng.max)
            except NotelabError as e:
                o["ngram_avg"] = o["ngram_max"] = {"failed": str(e)}
        if "prompt" in detectors:
            try:
                o["selfcheck_prompt"] = _scores(selfcheck_prompt(lm, response, samples[i]))
            except NotelabError as e:
                o["selfcheck_prompt"] = _scores(DetectorScores.failure(str(e)))
    if "factscore" in detectors:
        checks = check_facts(responses, LexicalSupport(), retriever=knowledge.search, k=3)
        for o, c in zip(out, checks):
            o["factscore"] = {"failed": c.failed} if c.failed else {**_scores(c.detector), "factscore": c.score}
    return out


def detect(args: argparse.Namespace) -> int:
    from notelab.data.retrieval import BM25Index

    detectors = parse_detectors(args.detectors)
    check_positive(samples=args.samples, max_new_tokens=args.max_new_tokens)
    if "factscore" in detectors and not args.knowledge:
        raise ConfigError("--detectors factscore: expected --knowledge DIR (a folder of .txt/.md/.jsonl), got none")
    out = check_out_file(args.out)
    rows = read_rows(args.input)
    index = BM25Index.from_folder(args.knowledge) if "factscore" in detectors else None
    lm = _model(args)
    results = run_detectors(lm, rows, detectors, index, args.samples, args.max_new_tokens)
    from notelab.core.io import atomic_write_text

    atomic_write_text(out, "".join(json.dumps(r) + "\n" for r in results))
    failed = sum(any("failed" in v for v in r.values()) for r in results)
    print(f"scored {len(rows)} rows with {', '.join(detectors)} ({failed} with a failed detector); wrote {out}")
    return 0


def knowledge(args: argparse.Namespace) -> int:
    from notelab.hallucination.stdlib_facts import write_knowledge

    path = write_knowledge(args.out, split=args.split)
    with path.open(encoding="utf-8") as f:
        n = sum(1 for _ in f)
    print(f"wrote {n} passages (module, signature, docstring summary per stdlib function) to {path}")
    return 0


# ---------------------------------------------------------------------------------------------- bench


def run_bench(
    lm: Any,  # noqa: ANN401
    task: str,
    data: str | None,
    n: int | None,
    seed: int,
    max_new_tokens: int,
    primer: str = "qa",
) -> dict:
    """One benchmark's report as a JSON-ready dict (also printed by the verbs)."""
    if task == "stdlib-facts":
        from notelab.hallucination import bench as hb
        from notelab.hallucination.stdlib_facts import stdlib_facts

        facts = stdlib_facts(n or 100, seed=seed, kinds=("params", "default"))
        answers = hb.answer_facts(lm, facts, max_new_tokens=max_new_tokens)
        r = hb.rates(facts, hb.wrong(facts, answers))
        return {"task": task, "questions": r.n, "hallucination_rate": r.overall, "by_kind": r.by_kind}
    if data is None:
        raise ConfigError(f"--task {task}: expected --data PATH, got none")
    if task == "truthfulqa":
        from notelab.hallucination.truthfulqa import QA_PRIMER, load_truthfulqa, score_truthfulqa

        questions = load_truthfulqa(data)[:n]
        result = score_truthfulqa(lm, questions, primer=QA_PRIMER if primer == "qa" else "")
        return {"task": task, "questions": result.n, "mc1": result.mc1, "mc2": result.mc2}
    from notelab.hallucination.detectors import token_uncertainty
    from notelab.hallucination.halueval import evaluate_detector, load_halueval

    items = load_halueval(data, limit=n)
    unc = {i.id: u for i, u in zip(items, token_uncertainty(lm, [i.prompt + "\n" for i in items],
                                                            [i.response for i in items]))}  # fmt: skip
    report: dict[str, Any] = {"task": task, "rows": len(items)}
    for label, pick in (("avg_nll", "mean_nll"), ("max_nll", "max_nll"), ("avg_entropy", "entropy")):

        def score(item: Any, pick: str = pick) -> float:  # noqa: ANN401
            d = getattr(unc[item.id], pick)
            if d is None or d.failed:
                raise DataError(d.failed if d is not None else "no entropies from this backend")
            return d.passage_score

        try:
            r = evaluate_detector(items, score)
            report[label] = {"auc_pr": r.auc_pr, "auc_roc": r.auc_roc, "random": r.positive_rate, "n": r.n,
                             "failed": len(r.failed)}  # fmt: skip
        except NotelabError as e:
            report[label] = {"failed": str(e)}
    return report


def _check_bench_args(args: argparse.Namespace) -> Path | None:
    check_positive(n=args.n, max_new_tokens=args.max_new_tokens)
    if args.data is not None and not Path(args.data).exists():
        raise DataError(f"--data: expected a file or folder, got {args.data!r} (no such path)")
    return check_out_file(args.out) if args.out else None


def _finish(report: dict, out: Path | None) -> int:
    from notelab.core.io import atomic_write_text

    print(json.dumps(report, indent=2))
    if out is not None:
        atomic_write_text(out, json.dumps(report, indent=2) + "\n")
    return 0


def bench(args: argparse.Namespace) -> int:
    out = _check_bench_args(args)
    lm = _model(args)
    return _finish(run_bench(lm, args.task, args.data, args.n, args.seed, args.max_new_tokens, args.primer), out)


def compare_with_local(remote: Any, local: Any, prompts: Sequence[str], max_new_tokens: int = 16) -> dict:  # noqa: ANN401
    """Greedy texts and the log-probabilities of those texts, from the endpoint and in process."""
    r_gen = remote.generate(prompts, max_new_tokens=max_new_tokens)
    l_gen = local.generate(prompts, max_new_tokens=max_new_tokens)
    same_text = [a[0].text == b[0].text for a, b in zip(r_gen, l_gen)]
    texts = [g[0].text or " " for g in l_gen]
    r_lp, l_lp = remote.logprobs(prompts, texts), local.logprobs(prompts, texts)
    diff = max((abs(x - y) for a, b in zip(r_lp, l_lp) for x, y in zip(a.logprobs, b.logprobs)), default=0.0)
    return {"greedy_text_equal": all(same_text), "max_logprob_diff": diff, "prompts": len(prompts)}


def serve_check(args: argparse.Namespace) -> int:
    out = _check_bench_args(args)
    remote = _endpoint(args)
    remote.generate(["def "], max_new_tokens=1)  # a dead or garbled endpoint fails here, before any work
    report: dict[str, Any] = {"base_url": args.base_url, "model": args.model}
    if args.checkpoint:
        local = _local(args)
        parity = compare_with_local(remote, local, ["def ", "import os\n", "class A:\n    def "])
        report["parity"] = parity
        if not parity["greedy_text_equal"] or parity["max_logprob_diff"] > 1e-3:
            raise DataError(
                f"serve-check: the server at {args.base_url} differs from {args.checkpoint}: greedy text equal "
                f"{parity['greedy_text_equal']}, largest log-prob difference {parity['max_logprob_diff']:.3g}"
            )
    report.update(run_bench(remote, args.task, args.data, args.n, args.seed, args.max_new_tokens, args.primer))
    return _finish(report, out)
