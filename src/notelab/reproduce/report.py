"""The HTML report: one section per claim, tables and PNG figures, no JavaScript.

Each section shows the verdict, the checks that decided it (rule, interval, verdict), the paper's
numbers beside ours, the measurements, and the raw settings in a collapsed ``<details>`` block.
"""

from __future__ import annotations

import datetime
import html
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from notelab import __version__
from notelab.core.io import atomic_write_text
from notelab.reproduce import rules
from notelab.reproduce.base import ClaimResult, Table

_CSS = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
h1 { margin-bottom: .2rem; } .meta { color: #666; font-size: .9rem; }
section { border-top: 1px solid #ddd; margin-top: 2rem; padding-top: 1rem; }
blockquote { color: #444; border-left: 3px solid #bbb; margin: .5rem 0; padding-left: .8rem; }
table { border-collapse: collapse; margin: .8rem 0; font-size: .9rem; }
th, td { border: 1px solid #ccc; padding: .25rem .6rem; text-align: right; } th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
.verdict { font-weight: bold; padding: .1rem .5rem; border-radius: .3rem; }
.holds { background: #d9f2d9; } .does-not-hold { background: #f8d7d7; } .inconclusive { background: #fdf0c4; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: .9rem; } .note { color: #555; font-size: .85rem; }
details { margin: .8rem 0; } summary { cursor: pointer; color: #444; }
pre { background: #f7f7f7; padding: .6rem; overflow-x: auto; font-size: .8rem; }
td.text, th.text { text-align: left; }
"""


def device_name() -> str:
    """The machine a run uses: the CUDA device's name when there is one (the claims run there), else the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    # the machine, not the threads: claims set their own (one_thread) inside the run
    return f"CPU ({platform.processor() or platform.machine() or 'unknown'}, {os.cpu_count()} cores)"


def _devices(results: Sequence[ClaimResult]) -> str:
    """Where the reported runs ran, from their own results (pooled runs may come from other machines);
    the machine writing the report only for results that did not record theirs."""
    names = list(dict.fromkeys(r.device or f"{device_name()} (this machine)" for r in results))
    return "; ".join(names) if names else device_name()


def _badge(verdict: str) -> str:
    return f'<span class="verdict {verdict.replace(" ", "-")}">{html.escape(verdict)}</span>'


def _checks(r: ClaimResult) -> str:
    """The decision: every check with its rule, interval and verdict, and each group's verdict."""
    if not r.checks:
        return ""
    groups = rules.group_verdicts(r.checks)
    rows = "".join(
        f'<tr><td class="text">{html.escape(c.group) if i == 0 or r.checks[i - 1].group != c.group else ""}</td>'
        f'<td class="text">{html.escape(c.name)}</td>'
        f'<td class="text">{html.escape(c.rule)}</td><td class="text">{html.escape(c.interval_text())}</td>'
        f"<td>{_badge(c.verdict)}"
        + ("" if c.role == "decides" else f' <span class="note">({html.escape(c.role)})</span>')
        + "</td></tr>"
        for i, c in enumerate(r.checks)
    )
    group_line = "; ".join(f"{html.escape(g)}: {_badge(v)}" for g, v in groups.items())
    return (
        "<h3>How the verdict was decided</h3>"
        f'<p class="note">Each check reads a sample (one value per seed, timing round or held-out pair) and '
        f"its {round(100 * rules.CONFIDENCE)}% Student-t interval of the mean (mean +- t * s / sqrt(n)): "
        "<b>holds</b> when the whole interval is on the claimed side of the limit, <b>does not hold</b> when "
        "it is wholly on the other side, <b>inconclusive</b> otherwise (or with one value). Noise-free "
        "measures are judged on their value. Every group must hold; within a group, alternatives (options) "
        "suffice. &quot;cannot refute&quot;: may make the claim inconclusive, never false; &quot;reported&quot;: "
        "shown, not counted.</p>"
        '<table><tr><th class="text">group</th><th class="text">check</th><th class="text">rule</th>'
        f'<th class="text">measured</th><th>verdict</th></tr>{rows}</table>'
        f"<p>Groups: {group_line}</p>"
    )


def _paper(r: ClaimResult) -> str:
    if not r.paper:
        return ""
    rows = "".join(
        f'<tr><td class="text">{html.escape(p.quantity)}</td><td class="text">{html.escape(p.paper)}</td>'
        f'<td class="text">{html.escape(p.ours)}</td><td class="text">{html.escape(p.source)}</td></tr>'
        for p in r.paper
    )
    return (
        "<h3>The paper's numbers beside ours</h3>"
        '<table><tr><th class="text">quantity</th><th class="text">paper</th><th class="text">this run</th>'
        f'<th class="text">source</th></tr>{rows}</table>'
    )


def _seeds(r: ClaimResult) -> str:
    if not r.seed_verdicts:
        return ""
    cells = ", ".join(f"seed {k}: {_badge(v)}" for k, v in r.seed_verdicts.items())
    reused = (
        f" Seed{'s' if len(r.reused_seeds) > 1 else ''} {', '.join(map(str, r.reused_seeds))} read from "
        "complete earlier runs (their seed-K/result.json), not run again."
        if r.reused_seeds
        else ""
    )
    return f"<p>Each run alone: {cells}; pooled (the verdict above): {_badge(r.verdict)}.{reused}</p>"


def _details(r: ClaimResult) -> str:
    parts = ", ".join(f"{html.escape(k)} {v:.0f} s" for k, v in r.part_seconds.items())
    raw = html.escape(json.dumps(r.settings, indent=1, default=str))
    return (
        f"<details><summary>Settings and timings (raw)</summary>"
        f'<p class="note">{r.seconds:.0f} s in all{"; " + parts if parts else ""}{_resumed(r)}</p><pre>{raw}</pre>'
        "</details>"
    )


def _resumed(r: ClaimResult) -> str:
    if not r.resumed_pieces:
        return ""
    return (
        f". A stopped run was picked up: {r.resumed_pieces} finished pieces (trainings, measurements) came from "
        "earlier sittings, so these times are the last sitting's only"
    )


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return html.escape(str(value))


def _table(t: Table) -> str:
    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in t.columns)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in row) + "</tr>" for row in t.rows)
    note = f'<p class="note">{html.escape(t.note)}</p>' if t.note else ""
    return f"<h3>{html.escape(t.title)}</h3><table><tr>{head}</tr>{body}</table>{note}"


def _section(r: ClaimResult) -> str:
    figs = "".join(
        f'<figure><img src="{html.escape(r.name)}/{html.escape(f.path)}" alt="{html.escape(f.title)}">'
        f"<figcaption><b>{html.escape(f.title)}.</b> {html.escape(f.caption)}</figcaption></figure>"
        for f in r.figures
    )
    return (
        f'<section id="{html.escape(r.name)}"><h2>{html.escape(r.title)}</h2>'
        f"<blockquote>{html.escape(r.claim)}</blockquote>"
        f'<p>Verdict: {_badge(r.verdict)} <span class="note">({r.seconds:.0f} s'
        f"{' on ' + html.escape(r.device) if r.device else ''}"
        f"{', the last sitting of a resumed run' if r.resumed_pieces else ''})</span></p>{_seeds(r)}"
        f"<p>{html.escape(r.summary)}</p>{_checks(r)}{_paper(r)}{''.join(_table(t) for t in r.tables)}{figs}"
        f"{_details(r)}</section>"
    )


def write_report(results: Sequence[ClaimResult], out_dir: str | Path, quick: bool, failures: dict[str, str]) -> Path:
    """Write ``out_dir/index.html`` summarising ``results`` (figures are already in ``out_dir/<claim>/``)."""
    out_dir = Path(out_dir)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    device = _devices(results)
    rows = "".join(
        f'<tr><td><a href="#{r.name}">{html.escape(r.title)}</a></td>'
        f"<td>{_badge(r.verdict)}</td><td>{r.seconds:.0f}</td>"
        f'<td class="text note">{html.escape(", ".join(f"{k} {v:.0f} s" for k, v in r.part_seconds.items()))}</td></tr>'
        for r in results
    )
    rows += "".join(
        f'<tr><td>{html.escape(n)}</td><td><span class="verdict does-not-hold">failed to run</span></td>'
        f"<td>{html.escape(e)}</td></tr>"
        for n, e in failures.items()
    )
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>notelab report</title><style>{_CSS}</style>"
        f"</head><body><h1>notelab: the notes' claims, reproduced</h1>"
        f'<p class="meta">{now} &middot; notelab {__version__} &middot; torch {torch.__version__} &middot; '
        f"{html.escape(device)} &middot; {'quick mode (small budgets)' if quick else 'full runs'}</p>"
        '<table><tr><th>claim</th><th>verdict</th><th>seconds</th><th class="text">time per part</th></tr>'
        f"{rows}</table>"
        f"{''.join(_section(r) for r in results)}</body></html>\n"
    )
    path = out_dir / "index.html"
    atomic_write_text(path, page)
    return path
