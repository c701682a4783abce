"""``notelab reproduce [NAME ...] [--quick]``: run claims and write the HTML report."""

from __future__ import annotations

import argparse
import datetime
import sys
import traceback
from pathlib import Path

from notelab.core.errors import NotelabError, unknown_name
from notelab.reproduce import CLAIMS, run_claim


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reproduce", help="reproduce the notes' claims and write an HTML report")
    p.add_argument("names", nargs="*", metavar="NAME", help=f"claims to run (default: all of {', '.join(CLAIMS)})")
    p.add_argument("--quick", action="store_true", help="small budgets (minutes on a laptop CPU)")
    p.add_argument("--out", default=None, help="report directory (default: reports/<date>)")
    p.add_argument("--seed", type=int, default=0)
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
    names = args.names or list(CLAIMS)
    out = Path(args.out or Path("reports") / datetime.date.today().isoformat())
    results, failures = [], {}
    for name in names:
        print(f"== {name}{' (quick)' if args.quick else ''}", flush=True)
        try:
            result = run_claim(name, out, quick=args.quick, seed=args.seed)
        except NotelabError:
            raise
        except Exception as e:  # one broken claim must not hide the others' results
            traceback.print_exc()
            failures[name] = f"{type(e).__name__}: {e}"
            continue
        results.append(result)
        print(f"   {result.verdict}: {result.summary} ({result.seconds:.0f} s)", flush=True)
    path = write_report(results, out, args.quick, failures)
    print(f"report: {path}")
    if failures:
        print(f"error: {len(failures)} claim(s) failed: {', '.join(failures)}", file=sys.stderr)
        return 1
    return 0
