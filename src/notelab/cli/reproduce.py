"""``notelab reproduce [NAME ...] [--quick] [--seed 0,1,2 | --seeds N] [--pool]``: run claims, write the HTML report.

While a claim runs, its parts and progress go to stderr; at the end, each claim's verdict and the
time of each part. With several seeds each claim runs once per seed (into ``OUT/NAME/seed-K``) and
the report gives the verdict of each run and the verdict of all runs' measurements pooled. A seed
whose folder already holds a complete result of the same claim, mode and seed is not run again: a
killed run picks up at the seed it was on, and seeds run apart (``--seed K --out R_K``, whose
``R_K/NAME`` is moved to ``R/NAME/seed-K``) are pooled by ``--seed 0,1,2 --out R``; ``--pool``
makes that run nothing (a missing or incomplete seed is an error instead of a run). Within a seed, a claim
that keeps its finished pieces (``notelab.reproduce.memo``: transformer-vs-rnn) computes only the missing
ones when the same command runs again after a stop.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import traceback
from pathlib import Path

from notelab.core.errors import ConfigError, NotelabError, unknown_name
from notelab.reproduce import CLAIMS, parse_seeds, run_seeds


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="reproduce the notes' claims and write an HTML report")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"claims to run (default: all of {', '.join(CLAIMS)})")
    p.add_argument("--quick", action="store_true", help="small budgets (minutes on a laptop CPU)")
    p.add_argument("--out", default=None, help="report directory (default: reports/<date>)")
    seeds = p.add_mutually_exclusive_group()
    seeds.add_argument("--seed", default="0", help="seed, or comma-separated seeds (0,1,2): one run each, pooled")
    seeds.add_argument(
        "--seeds", type=int, default=None, metavar="N", help="the seeds 0..N-1 (same as --seed 0,..,N-1)"
    )
    p.add_argument(
        "--pool",
        action="store_true",
        help="run nothing: pool the complete OUT/NAME/seed-K results of the --seed list (made elsewhere)",
    )
    p.add_argument("--list", action="store_true", help="list the claims and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from notelab.reproduce.report import write_report  # imports torch: only when a claim runs (fast --help)

    if args.list:
        print("\n".join(CLAIMS))
        return 0
    for name in args.names:
        if name not in CLAIMS:
            raise unknown_name("claim", name, CLAIMS)
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError(f"--seeds: expected an integer >= 1, got {args.seeds}")
    seeds = list(range(args.seeds)) if args.seeds is not None else parse_seeds(args.seed)
    if args.pool and len(seeds) < 2:
        raise ConfigError(f"--pool: expected at least two seeds (--seed 0,1,2), got {', '.join(map(str, seeds))}")
    names = args.names or list(CLAIMS)
    out = Path(args.out or Path("reports") / datetime.date.today().isoformat())
    results, failures = [], {}
    for name in names:
        print(f"== {name}{' (quick)' if args.quick else ''}, seed{'s' if len(seeds) > 1 else ''} "
              f"{', '.join(map(str, seeds))}", flush=True)  # fmt: skip
        try:
            result = run_seeds(name, out, seeds, quick=args.quick, progress_stream=sys.stderr, pool_only=args.pool)
        except NotelabError:
            raise
        except Exception as e:  # one broken claim must not hide the others' results
            traceback.print_exc()
            failures[name] = f"{type(e).__name__}: {e}"
            continue
        results.append(result)
        print(f"   {result.verdict}: {result.summary} ({result.seconds:.0f} s)", flush=True)
    path = write_report(results, out, args.quick, failures)
    print("time per part:")
    for r in results:
        parts = ", ".join(f"{part} {sec:.0f} s" for part, sec in r.part_seconds.items())
        print(f"   {r.name} ({r.seconds:.0f} s, {r.verdict}): {parts}")
    print(f"report: {path}")
    if failures:
        print(f"error: {len(failures)} claim(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0
