"""What a reproduced claim returns: tables, figures and a verdict, ready for the report."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

VERDICTS = ("holds", "does not hold", "inconclusive")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Figure:
    title: str
    path: str  # PNG file name, relative to the claim's output directory
    caption: str = ""


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

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")
