"""The ``valfree`` command: the list of commands and the error handling. Each command lives in its own
module under :mod:`valfree.commands`, with its parser, its ``run(args)`` and its runner.

User mistakes raise :class:`valfree.ValfreeError`; they are printed as one sentence on stderr with
exit code 2, as are mistakes in the arguments themselves. Exit code 1 means the command ran but some
items failed (recorded in its output).

Building the parser imports no torch: the command modules load torch when they run, so that
``valfree --help`` answers at once (tests/commands/test_cli_habits.py checks it).
"""

from __future__ import annotations

import argparse
import sys

from .commands import EXIT_PARTIAL_FAILURE, EXIT_USER_ERROR, demo, prune, report, score, select, tpv
from .commands.arguments import Parser
from .errors import ValfreeError

__all__ = ["COMMANDS", "EXIT_PARTIAL_FAILURE", "EXIT_USER_ERROR", "build_parser", "main"]

# In the order `valfree --help` lists them.
COMMANDS = (score, select, report, demo, tpv, prune)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="valfree",
        description="Model selection without validation labels: head-gradient probe, TPV, label-free pruning.",
        epilog="Every command takes -o/--out for what it writes, --quiet, and --help. Exit codes: 0 done, "
               "1 some checkpoints failed (recorded in the output), 2 a mistake in the arguments or the input.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a mistake argparse has already reported in one line
        return exc.code if isinstance(exc.code, int) else EXIT_USER_ERROR
    try:
        return int(args.func(args) or 0)
    except ValfreeError as exc:
        print(f"valfree {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except SystemExit as exc:
        # Our own code returns exit codes; a SystemExit here comes from user code the command imported
        # or called (a --model or --data module that exits when imported, say), which would otherwise
        # end the run without a word.
        code = exc.code if isinstance(exc.code, int) else 1
        print(f"valfree {args.command}: error: code the command ran (a --model or --data module?) called "
              f"sys.exit({exc.code!r}); guard a module's script part with if __name__ == '__main__'.",
              file=sys.stderr)
        return code if code else EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"valfree {args.command}: interrupted; results written so far are kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
