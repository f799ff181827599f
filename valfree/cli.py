"""The ``valfree`` command: the list of commands and the error handling. Each command lives in its own
module under :mod:`valfree.commands`, with its parser, its ``run(args)`` and its runner.

User mistakes raise :class:`valfree.ValfreeError`; they are printed as one sentence on stderr with
exit code 2. Exit code 1 means the command ran but some items failed (recorded in its output).
"""

from __future__ import annotations

import argparse
import sys

from .commands import EXIT_PARTIAL_FAILURE, EXIT_USER_ERROR, demo, prune, report, score, select, tpv
from .errors import ValfreeError

__all__ = ["COMMANDS", "EXIT_PARTIAL_FAILURE", "EXIT_USER_ERROR", "build_parser", "main"]

# In the order `valfree --help` lists them.
COMMANDS = (score, select, report, demo, tpv, prune)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="valfree",
        description="Model selection without validation labels: head-gradient probe, TPV, label-free pruning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValfreeError as exc:
        print(f"valfree {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"valfree {args.command}: interrupted; results written so far are kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
