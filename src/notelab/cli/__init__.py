"""``notelab <family> <verb>`` and ``notelab reproduce``: parse, call the library, print.

Bad input anywhere in the library raises a :class:`NotelabError`; here it (and a file that cannot
be read or written, or text that is not UTF-8) becomes one line on stderr and exit code 2, so
scripts can tell a usage error from a crash (``notelab.cli.common.run_verb``). torch is imported
only once a verb runs, so ``notelab --help`` is fast.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

from notelab import __version__
from notelab.cli.common import run_verb, set_threads

# Each module registers its subcommands through `add_parser(subparsers)`.
COMMANDS = (
    "notelab.cli.reproduce",
    "notelab.cli.diffusion",
    "notelab.cli.seq",
    "notelab.cli.lm",
    "notelab.cli.flows",
    "notelab.cli.vq",
    "notelab.cli.peft",
    "notelab.cli.oad",
    "notelab.cli.hallucination",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="notelab", description="ML study notes as working, tested code.")
    parser.add_argument("--version", action="version", version=f"notelab {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        importlib.import_module(module).add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad input or usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    set_threads()
    return run_verb(args.func, args)
