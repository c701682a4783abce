"""What a reproduced claim returns (tables, figures, checks and a verdict) and what every claim
shares while it runs: progress lines, one-thread execution of small models, derived seeds.

A result is written as ``result.json`` (``dataclasses.asdict``) and read back by
:meth:`ClaimResult.from_dict`, which validates every field (never unpickles), so that a pooled
``--seed 0,1,2`` run can reuse the complete runs of a crashed or split attempt.
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from notelab.core.config import config_from_dict
from notelab.core.errors import DataError
from notelab.reproduce.rules import Check, claim_verdict

VERDICTS = ("holds", "does not hold", "inconclusive")


def parsed(cls: type, data: Any, where: str) -> Any:
    """``cls`` built from parsed JSON, every field checked against its type hint; a bad field (or a
    value its ``__post_init__`` refuses) is one :class:`DataError` line naming it."""
    try:
        return config_from_dict(cls, data, where)
    except ValueError as e:  # ConfigError names the field; __post_init__ raises ValueError
        raise DataError(str(e)) from None


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""

    @classmethod
    def from_dict(cls, data: Any, where: str = "table") -> Table:
        return parsed(cls, data, where)


@dataclass
class Figure:
    title: str
    path: str  # PNG file name, relative to the claim's output directory
    caption: str = ""

    @classmethod
    def from_dict(cls, data: Any, where: str = "figure") -> Figure:
        return parsed(cls, data, where)


@dataclass
class PaperNumber:
    """A figure the paper reports, beside the one this run measured (never a number we did not read)."""

    quantity: str  # e.g. "FID, DDIM eta=0, S=20 (CIFAR-10)"
    paper: str  # the paper's value, as printed there
    source: str  # paper and table / section
    ours: str  # our counterpart, with its setting (different data and scale: say so in `quantity`)

    @classmethod
    def from_dict(cls, data: Any, where: str = "paper") -> PaperNumber:
        return parsed(cls, data, where)


@dataclass
class ClaimResult:
    name: str  # the claim's registry name, e.g. "ddim"
    title: str
    claim: str  # the note's sentence being tested
    verdict: str  # one of VERDICTS
    summary: str  # what the measurements show, in a few sentences
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    checks: list[Check] = field(default_factory=list)  # what the verdict was decided by
    paper: list[PaperNumber] = field(default_factory=list)
    part_seconds: dict[str, float] = field(default_factory=dict)
    seed_verdicts: dict[int, str] = field(default_factory=dict)  # per run seed, when several were pooled
    # what the run was: a complete result.json is reused only for the same claim, mode and seed
    seed: int | None = None  # None: several seeds pooled (or a result written before seeds were recorded)
    quick: bool | None = None
    device: str = ""  # where the run ran (pooled: each machine with its seeds), e.g. "NVIDIA H200"
    reused_seeds: list[int] = field(default_factory=list)  # pooled: seeds read from an earlier run's result.json
    # finished pieces a stopped run left (notelab.reproduce.memo) that this run picked up: its seconds are then
    # those of its last sitting only (pooled: summed over the runs)
    resumed_pieces: int = 0

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")

    @classmethod
    def from_sections(
        cls,
        name: str,
        title: str,
        claim: str,
        sections: Sequence[Section],
        *,
        summary: str,
        settings: dict[str, Any],
        t_start: float,
        progress: Progress,
        verdict: str | None = None,
        paper: Sequence[PaperNumber] = (),
    ) -> ClaimResult:
        """A claim's result from its sections' tables, figures, checks and paper numbers, in order (then
        ``paper``); the verdict by :func:`claim_verdict` of those checks unless given, the seconds since
        ``t_start`` and the part times of ``progress``."""
        checks = [c for sec in sections for c in sec.checks]
        return cls(
            name=name,
            title=title,
            claim=claim,
            verdict=claim_verdict(checks) if verdict is None else verdict,
            summary=summary,
            tables=[t for sec in sections for t in sec.tables],
            figures=[f for sec in sections for f in sec.figures],
            settings=settings,
            seconds=time.perf_counter() - t_start,
            checks=checks,
            paper=[p for sec in sections for p in sec.paper] + list(paper),
            part_seconds=dict(progress.seconds),
        )

    @classmethod
    def from_dict(cls, data: Any, where: str = "result") -> ClaimResult:
        """A result from its JSON form (``dataclasses.asdict`` of one), every field validated (the
        checks' verdicts recomputed from their values); a corrupt or foreign one is one
        :class:`DataError` line."""
        if not isinstance(data, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(data).__name__}")
        data = dict(data)
        checks, verdicts = data.pop("checks", []), data.pop("seed_verdicts", {})
        if not isinstance(checks, list):
            raise DataError(f"{where}.checks: expected a list, got {type(checks).__name__}")
        if not isinstance(verdicts, dict) or not all(_seed_key(k) is not None for k in verdicts):
            raise DataError(f"{where}.seed_verdicts: expected an object from seeds (integers >= 0) to verdicts")
        bad = [v for v in verdicts.values() if v not in VERDICTS]
        if bad:
            raise DataError(f"{where}.seed_verdicts: expected verdicts among {VERDICTS}, got {bad[0]!r}")
        result = parsed(cls, data, where)
        if result.seed is not None and result.seed < 0 or any(k < 0 for k in result.reused_seeds):
            raise DataError(f"{where}: expected seeds >= 0, got {result.seed} / {result.reused_seeds}")
        if result.resumed_pieces < 0:
            raise DataError(f"{where}.resumed_pieces: expected a count >= 0, got {result.resumed_pieces}")
        result.checks = [Check.from_dict(c, f"{where}.checks[{i}]") for i, c in enumerate(checks)]
        result.seed_verdicts = {_seed_key(k): v for k, v in verdicts.items()}
        return result


def _seed_key(key: object) -> int | None:
    """A seed_verdicts key: an int in memory, its decimal string once through JSON; None if neither."""
    if isinstance(key, int) and not isinstance(key, bool):
        return key if key >= 0 else None
    if isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 19:
        return int(key)
    return None


@dataclass
class Section:
    """What one measurement of a claim adds to the report, the checks it decides, and the numbers
    later sections or the summary read."""

    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    paper: list[PaperNumber] = field(default_factory=list)


class Progress:
    """Lines on stderr while a claim runs: which part, how far, and how long each part took.

    A claim's parts are wrapped in :meth:`part`; long loops call :meth:`step`. Nothing is printed
    when ``stream`` is None (tests).
    """

    def __init__(self, claim: str, stream: TextIO | None = sys.stderr) -> None:
        self.claim = claim
        self.stream = stream
        self.seconds: dict[str, float] = {}
        self._t0 = time.perf_counter()
        self._part = ""

    def say(self, text: str) -> None:
        if self.stream is not None:
            elapsed = time.perf_counter() - self._t0
            print(f"[{self.claim} {elapsed:6.0f} s] {text}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def part(self, name: str) -> Iterator[None]:
        self._part, t0 = name, time.perf_counter()
        self.say(f"{name} ...")
        outcome = "failed after"
        try:
            yield
            outcome = "done in"
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - t0, 1)
            self.say(f"{name}: {outcome} {time.perf_counter() - t0:.0f} s")
            self._part = ""

    def step(self, i: int, n: int, what: str) -> None:
        """Item ``i`` (1-based) of ``n`` of the current part is starting."""
        self.say(f"  {self._part} {i}/{n}: {what}")


def quiet() -> Progress:
    """A :class:`Progress` that prints nothing (the default of a claim's ``run``)."""
    return Progress("", stream=None)


def begin(out_dir: str | Path, seed: int, progress: Progress | None) -> tuple[Path, Progress, float]:
    """What every claim's ``run`` does first: its folder (created), a progress sink (``quiet`` by
    default), the global seed, and the start time."""
    from notelab.core.runtime import seed_everything

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)
    return out, progress or quiet(), time.perf_counter()


@contextlib.contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """One intra-op thread on CPU while small models run: their ops are too small to split, and
    on a busy machine a second thread mostly waits (several times slower). It also makes the
    numbers of a quick run the same on a busy machine as on a quiet one (same reductions)."""
    import torch

    before = torch.get_num_threads()
    if enabled and not torch.cuda.is_available():
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def derived_seeds(seed: int, n: int) -> list[int]:
    """The seeds of ``n`` repeats inside a run of ``seed``: seed, seed + 1000, ... (distinct across
    runs of seeds 0..999, so that pooling ``--seed 0,1,2`` never counts one training twice)."""
    return [seed + 1000 * k for k in range(n)]


def mean_std(values: list[float], digits: int = 2) -> str:
    """``"mean +- std"`` of ``values`` (sample std), or the single value."""
    if len(values) < 2:
        return f"{values[0]:.{digits}f}" if values else "-"
    return f"{statistics.fmean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}"
