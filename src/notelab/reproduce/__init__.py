"""One recipe per note's claim: each runs an experiment and returns tables, figures and a verdict.

A claim is a module with ``run(out_dir, quick=False, seed=0) -> ClaimResult``. The registry below
is a plain mapping from name to module path, imported only when the claim runs.
"""

from __future__ import annotations

import importlib
import json
import time
from dataclasses import asdict
from pathlib import Path

from notelab.core.errors import unknown_name
from notelab.core.io import atomic_write_text
from notelab.reproduce.base import ClaimResult, Figure, Table

CLAIMS: dict[str, str] = {
    "ddim": "notelab.reproduce.ddim",
    "transformer-vs-rnn": "notelab.reproduce.transformer_vs_rnn",
    "llama": "notelab.reproduce.llama",
}


def run_claim(name: str, out_dir: str | Path, quick: bool = False, seed: int = 0) -> ClaimResult:
    """Run one claim, writing its figures and ``result.json`` under ``out_dir/name``."""
    if name not in CLAIMS:
        raise unknown_name("claim", name, CLAIMS)
    out = Path(out_dir) / name
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = importlib.import_module(CLAIMS[name]).run(out, quick=quick, seed=seed)
    result.seconds = result.seconds or time.perf_counter() - start
    atomic_write_text(out / "result.json", json.dumps(asdict(result), indent=2, default=str) + "\n")
    return result


__all__ = ["CLAIMS", "ClaimResult", "Figure", "Table", "run_claim"]
