"""One recipe per note's claim: each runs an experiment and returns tables, figures, checks and a verdict.

A claim is a module with ``run(out_dir, quick=False, seed=0, progress=None) -> ClaimResult``. The
registry below is a plain mapping from name to module path, imported only when the claim runs.
:func:`run_seeds` runs a claim once per seed and pools the checks of all runs into one verdict
(:func:`notelab.reproduce.rules.pool`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TextIO

from notelab.core.errors import ConfigError, unknown_name
from notelab.core.io import atomic_write_text
from notelab.reproduce import rules
from notelab.reproduce.base import ClaimResult, Figure, Progress, Table, quiet

CLAIMS: dict[str, str] = {
    "ddim": "notelab.reproduce.ddim",
    "transformer-vs-rnn": "notelab.reproduce.transformer_vs_rnn",
    "llama": "notelab.reproduce.llama",
    "flows": "notelab.reproduce.flows",
    "vqvae": "notelab.reproduce.vqvae",
    "peft": "notelab.reproduce.peft",
    "oadtr": "notelab.reproduce.oadtr",
    "sde": "notelab.reproduce.score_sde",
}


def run_claim(
    name: str, out_dir: str | Path, quick: bool = False, seed: int = 0, progress: Progress | None = None
) -> ClaimResult:
    """Run one claim, writing its figures and ``result.json`` under ``out_dir/name``."""
    return _run_into(name, Path(out_dir) / name, quick, seed, progress)


def _run_into(name: str, out: Path, quick: bool, seed: int, progress: Progress | None) -> ClaimResult:
    if name not in CLAIMS:
        raise unknown_name("claim", name, CLAIMS)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = importlib.import_module(CLAIMS[name]).run(out, quick=quick, seed=seed, progress=progress or quiet())
    result.seconds = result.seconds or time.perf_counter() - start
    atomic_write_text(out / "result.json", json.dumps(asdict(result), indent=2, default=str) + "\n")
    return result


def run_seeds(
    name: str, out_dir: str | Path, seeds: Sequence[int], quick: bool = False, progress_stream: TextIO | None = None
) -> ClaimResult:
    """Run ``name`` once per seed (into ``out_dir/name/seed-K`` when more than one) and pool them.

    One seed gives that run's result (in ``out_dir/name``); several give :func:`combine`'s, also
    written to ``out_dir/name/result.json``.
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(k < 0 for k in seeds):
        raise ConfigError(f"seeds: expected distinct integers >= 0, got {seeds}")

    def progress(label: str) -> Progress:
        return Progress(label, stream=progress_stream) if progress_stream is not None else quiet()

    if len(seeds) == 1:
        return run_claim(name, out_dir, quick, seeds[0], progress(name))
    out = Path(out_dir) / name
    results = [_run_into(name, out / f"seed-{k}", quick, k, progress(f"{name} seed {k}")) for k in seeds]
    combined = combine(results, seeds)
    atomic_write_text(out / "result.json", json.dumps(asdict(combined), indent=2, default=str) + "\n")
    return combined


def combine(results: Sequence[ClaimResult], seeds: Sequence[int]) -> ClaimResult:
    """One result for runs of one claim with different seeds: the checks pooled over all runs, the
    verdict from them, each run's own verdict, and the first run's tables and figures."""
    first, k0 = results[0], seeds[0]
    checks = rules.pool([r.checks for r in results])
    verdict = rules.claim_verdict(checks)
    per_seed = {k: r.verdict for k, r in zip(seeds, results)}
    parts: dict[str, float] = {}
    for r in results:
        for part, sec in r.part_seconds.items():
            parts[part] = round(parts.get(part, 0.0) + sec, 1)
    summary = (
        f"Pooled over the runs of seeds {', '.join(map(str, seeds))}: {verdict}; each run alone: "
        + ", ".join(f"seed {k} {v}" for k, v in per_seed.items())
        + f". Tables and figures below are seed {k0}'s: {first.summary}"
    )
    return dataclasses.replace(
        first,
        verdict=verdict,
        summary=summary,
        tables=[dataclasses.replace(t, title=f"{t.title} [seed {k0}]") for t in first.tables],
        figures=[dataclasses.replace(f, path=f"seed-{k0}/{f.path}") for f in first.figures],
        settings={"seeds": list(seeds), "results": [f"seed-{k}/result.json" for k in seeds]},
        seconds=sum(r.seconds for r in results),
        checks=checks,
        part_seconds=parts,
        seed_verdicts=per_seed,
    )


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; a bad list is one :class:`ConfigError` line."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"--seed: expected an integer or a comma-separated list such as 0,1,2, got {text!r}"
        ) from None
    if len(set(seeds)) != len(seeds) or any(k < 0 for k in seeds):
        raise ConfigError(f"--seed: expected distinct integers >= 0, got {text!r}")
    return seeds


__all__ = ["CLAIMS", "ClaimResult", "Figure", "Table", "combine", "parse_seeds", "run_claim", "run_seeds"]
