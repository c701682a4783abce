"""One recipe per note's claim: each runs an experiment and returns tables, figures, checks and a verdict.

A claim is a module with ``run(out_dir, quick=False, seed=0, progress=None) -> ClaimResult``. The
registry below is a plain mapping from name to module path, imported only when the claim runs.
:func:`run_seeds` runs a claim once per seed and pools the checks of all runs into one verdict
(:func:`notelab.reproduce.rules.pool`). A seed whose folder already holds a complete
``result.json`` of the same claim, mode and seed is read back instead of run again, so a killed
pooled run resumes at the seed it was on, and seeds run on several machines pool once their
``seed-K`` folders sit side by side.
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

from notelab.core.config import MAX_JSON_BYTES
from notelab.core.errors import ConfigError, DataError, unknown_name
from notelab.core.io import atomic_write_text
from notelab.reproduce import memo, rules
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
    "hallucination": "notelab.reproduce.hallucination",
}


def run_claim(
    name: str, out_dir: str | Path, quick: bool = False, seed: int = 0, progress: Progress | None = None
) -> ClaimResult:
    """Run one claim, writing its figures and ``result.json`` under ``out_dir/name``."""
    return _run_into(name, Path(out_dir) / name, quick, seed, progress)


def _run_into(name: str, out: Path, quick: bool, seed: int, progress: Progress | None) -> ClaimResult:
    if name not in CLAIMS:
        raise unknown_name("claim", name, CLAIMS)
    from notelab.reproduce.report import device_name  # imports torch, as the claim does

    out.mkdir(parents=True, exist_ok=True)
    # The run rewrites this folder's figures: an earlier result.json (another mode or seed, or the
    # same one being re-run) would no longer match them if this run died half-way, and a pooled run
    # would then reuse it; without one the folder reads as incomplete until this run's is written.
    (out / "result.json").unlink(missing_ok=True)
    start = time.perf_counter()
    result = importlib.import_module(CLAIMS[name]).run(out, quick=quick, seed=seed, progress=progress or quiet())
    result.seconds = result.seconds or time.perf_counter() - start
    result = dataclasses.replace(result, seed=seed, quick=quick, device=device_name())
    atomic_write_text(out / "result.json", json.dumps(asdict(result), indent=2, default=str) + "\n")
    memo.clear(out)  # the finished pieces of a stopped run (notelab.reproduce.memo): the result now holds them
    return result


def read_result(path: str | Path) -> ClaimResult:
    """The :class:`ClaimResult` in the JSON file ``path``, validated (never unpickled); a missing,
    oversized, non-UTF-8, truncated or foreign file is one :class:`DataError` line."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise DataError(f"{path}: expected a result of at most {MAX_JSON_BYTES} bytes, got {size}")
        # json's NaN / Infinity are accepted: a check's interval is infinite with one value
        data = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from None
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise DataError(
            f"{path}: not a JSON result ({str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from None
    return ClaimResult.from_dict(data, str(path))


def reusable(folder: Path, name: str, quick: bool, seed: int) -> tuple[ClaimResult | None, str]:
    """``(result, "")`` when ``folder/result.json`` is a complete run of claim ``name`` with this
    mode and seed whose figures are all in ``folder``; else ``(None, why)`` (``why`` empty when
    there is no result.json at all: nothing to say)."""
    path = folder / "result.json"
    if not path.exists():
        return None, ""
    try:
        r = read_result(path)
    except DataError as e:
        return None, str(e)
    if r.name != name:
        return None, f"it is claim {r.name!r}'s, not {name!r}'s"
    if r.seed != seed or r.quick is not quick:
        return None, f"it is {_run_kind(r.quick, r.seed)}, not {_run_kind(quick, seed)}"
    top = folder.resolve()
    for f in r.figures:
        where = (folder / f.path).resolve()
        if not where.is_relative_to(top) or not where.is_file():
            return None, f"its figure {f.path!r} is not in {folder}"
    return r, ""


def _run_kind(quick: bool | None, seed: int | None) -> str:
    if quick is None or seed is None:  # written before results recorded them, or a pooled result
        return "a result that records no mode or seed of its own"
    return f"a {'quick' if quick else 'full'} run of seed {seed}"


def run_seeds(
    name: str,
    out_dir: str | Path,
    seeds: Sequence[int],
    quick: bool = False,
    progress_stream: TextIO | None = None,
    pool_only: bool = False,
) -> ClaimResult:
    """Run ``name`` once per seed (into ``out_dir/name/seed-K`` when more than one) and pool them.

    One seed gives that run's result (in ``out_dir/name``, always run). Several give
    :func:`combine`'s, also written to ``out_dir/name/result.json``; a seed whose folder holds a
    :func:`reusable` result is read instead of run, and one whose result.json is corrupt, foreign or
    of another mode or seed is run again (a one-line notice on ``progress_stream`` either way).
    ``pool_only``: run nothing; every seed must be reusable (e.g. runs made on a GPU machine, pooled
    on a laptop), else one :class:`DataError` line naming each one that is not, before any writing.
    """
    seeds = list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or any(k < 0 for k in seeds):
        raise ConfigError(f"seeds: expected distinct integers >= 0, got {seeds}")
    if name not in CLAIMS:
        raise unknown_name("claim", name, CLAIMS)
    if pool_only and len(seeds) < 2:
        raise ConfigError(f"pooling: expected at least two seeds, got {seeds}")

    def progress(label: str) -> Progress:
        return Progress(label, stream=progress_stream) if progress_stream is not None else quiet()

    def notice(k: int, text: str) -> None:
        if progress_stream is not None:
            print(f"[{name} seed {k}] {text}", file=progress_stream, flush=True)

    if len(seeds) == 1:
        return run_claim(name, out_dir, quick, seeds[0], progress(name))
    out = Path(out_dir) / name
    found = {k: reusable(out / f"seed-{k}", name, quick, k) for k in seeds}
    missing = {k: why or "no result.json" for k, (r, why) in found.items() if r is None}
    if pool_only and missing:
        raise DataError(
            f"pooling {name} ({'quick' if quick else 'full'}): expected a complete result in "
            + "; ".join(f"{out / f'seed-{k}'} ({why})" for k, why in missing.items())
        )
    results = []
    for k in seeds:
        result, why = found[k]
        if result is not None:
            notice(k, f"reusing the complete run in {out / f'seed-{k}'} ({result.verdict}, {result.seconds:.0f} s)")
        else:
            if why:
                notice(k, f"not reusing {out / f'seed-{k}' / 'result.json'}: {why}; running it again")
            result = _run_into(name, out / f"seed-{k}", quick, k, progress(f"{name} seed {k}"))
        results.append(result)
    combined = combine(results, seeds, [k for k in seeds if k not in missing])
    atomic_write_text(out / "result.json", json.dumps(asdict(combined), indent=2, default=str) + "\n")
    return combined


def combine(results: Sequence[ClaimResult], seeds: Sequence[int], reused: Sequence[int] = ()) -> ClaimResult:
    """One result for runs of one claim with different seeds: the checks pooled over all runs, the
    verdict from them, each run's own verdict, the first run's tables and figures, the machines the
    runs used, and which seeds (``reused``) were read from an earlier run rather than run now."""
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
        + (f" (seed{'s' if len(reused) > 1 else ''} {', '.join(map(str, reused))} read from earlier complete runs)"
           if reused else "")
        + f". Tables and figures below are seed {k0}'s: {first.summary}"
    )  # fmt: skip
    return dataclasses.replace(
        first,
        verdict=verdict,
        summary=summary,
        tables=[dataclasses.replace(t, title=f"{t.title} [seed {k0}]") for t in first.tables],
        figures=[dataclasses.replace(f, path=f"seed-{k0}/{f.path}") for f in first.figures],
        settings={
            "seeds": list(seeds),
            "results": [f"seed-{k}/result.json" for k in seeds],
            "reused_seeds": list(reused),
        },
        seconds=sum(r.seconds for r in results),
        checks=checks,
        part_seconds=parts,
        seed_verdicts=per_seed,
        seed=None,
        device=_devices(results, seeds),
        reused_seeds=list(reused),
        resumed_pieces=sum(r.resumed_pieces for r in results),
    )


def _devices(results: Sequence[ClaimResult], seeds: Sequence[int]) -> str:
    """The machines pooled runs used: one name, or each with its seeds ("A (seeds 0, 1); B (seed 2)")."""
    by_device: dict[str, list[int]] = {}
    for r, k in zip(results, seeds):
        by_device.setdefault(r.device or "unrecorded", []).append(k)
    if len(by_device) == 1:
        return next(iter(by_device))
    return "; ".join(f"{d} (seed{'s' if len(ks) > 1 else ''} {', '.join(map(str, ks))})" for d, ks in by_device.items())


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


__all__ = [
    "CLAIMS",
    "ClaimResult",
    "Figure",
    "Table",
    "combine",
    "parse_seeds",
    "read_result",
    "reusable",
    "run_claim",
    "run_seeds",
]
