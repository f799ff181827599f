"""Argument types and conventions shared by every command's parser.

Numbers are checked when the command line is parsed, so that ``--batch-size -5`` or ``--ema nan`` is
one sentence and exit code 2 before anything is loaded; argparse turns the ``ArgumentTypeError`` these
types raise into that sentence. The module imports neither torch nor numpy: ``valfree --help`` and
``valfree score --help`` build every parser from here and from the command modules, which load their
heavy dependencies only when they run.

The conventions every command follows:

- ``-o/--out`` names what a command writes (``--output`` is kept as an alias where it existed).
- ``--quiet`` turns off progress bars and step-by-step messages; results and errors still print.
  Without it, progress bars appear only on a terminal, never in a log file or a pipe.
- Every option has help text, and ``--help`` shows each default (see :class:`HelpFormatter`).
"""

from __future__ import annotations

import argparse
import math
import sys

# The choices of a few options, named here so that the parsers need not import the registries they
# come from (which import torch). tests/commands/test_arguments.py checks that they agree.
LOSSES = ("ce", "bce", "focal", "mse", "l1")  # valfree.probes.LOSSES
PRESETS = ("classification", "segmentation", "centernet", "diffusion-eps", "diffusion-v", "lm")  # valfree.probes.presets.PRESETS
SPLITS = ("train", "test")  # valfree.io.data.SPLITS
MODES = ("min", "max")  # valfree.selection.MODES
TPV_METHODS = ("trace", "monte_carlo", "exact")  # valfree.tpv.METHODS
TPV_OUTPUTS = ("logits", "probs", "log_probs")  # valfree.tpv.estimators.OUTPUTS
PRUNE_TARGETS = ("channels", "params", "macs")  # valfree.pruning.options.TARGETS


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` after an option's help, except where there is nothing to show (None,
    False, an empty list) or the help text already states the default in its own words."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            return text  # a flag's default is its absence
        # Identity, not equality: a default of 0 is worth showing, a default of False is not.
        if "default" in text.lower() or default is None or default is False or default is argparse.SUPPRESS \
                or default == []:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            return text + " (default: %(default)s)"
        return text


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose mistakes are one line on stderr (exit code 2), and whose help shows
    the defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        message = message.rstrip(".")
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'.\n")


def _number(text: str, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        name = "an integer" if kind is int else "a number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {name}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, not {text!r}")
    return value


def finite_float(text: str) -> float:
    """Any finite number (NaN and inf are refused)."""
    return _number(text)


def positive_float(text: str) -> float:
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, not {text}")
    return value


def nonnegative_float(text: str) -> float:
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or more, not {text}")
    return value


def positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, not {text}")
    return value


def nonnegative_int(text: str) -> int:
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be zero or a positive integer, not {text}")
    return value


def at_least(minimum: int):
    """An integer type that refuses values below ``minimum``."""

    def parse(text: str) -> int:
        value = _number(text, int)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer of at least {minimum}, not {text}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def fraction(text: str) -> float:
    """A number strictly between 0 and 1 (a pruning ratio)."""
    value = _number(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie strictly between 0 and 1, not {text}")
    return value


def probability(text: str) -> float:
    """A number in [0, 1] (a confidence threshold)."""
    value = _number(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1, not {text}")
    return value


def label_smoothing(text: str) -> float:
    """Label smoothing, in [0, 1) as torch's cross-entropy takes it."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), not {text}")
    return value


def ema_span(text: str) -> float:
    """An EMA span: a finite number >= 0, where a span of 1 or less means no smoothing."""
    value = _number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an EMA span of 0 or more (1 or less disables smoothing), not {text}")
    return value


def tail(text: str) -> str:
    """A tail window: a fraction in (0, 1] or a whole count of points >= 1. Kept as text, because
    ``--tail 1`` (one point) and ``--tail 1.0`` (the whole run) differ; select's ``parse_tail`` reads it."""
    value = _number(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a fraction like 0.2 or a count like 10, not {text}")
    if value > 1 and not value.is_integer():
        raise argparse.ArgumentTypeError(f"must be a fraction in (0, 1] or a whole count of points, not {text}")
    return text.strip()


def add_out(p, default, help: str, aliases: tuple[str, ...] = ()) -> None:
    """The output option every command names the same way: ``-o/--out`` (dest ``out``)."""
    p.add_argument("-o", "--out", *aliases, dest="out", default=default, help=help)


def add_quiet(p, help: str = "no progress bars or step-by-step messages; results and errors still print "
                              "(progress bars appear only on a terminal in any case)") -> None:
    p.add_argument("-q", "--quiet", action="store_true", help=help)


def add_device(p) -> None:
    p.add_argument("--device", default="cpu",
                   help="torch device: cpu, cuda, cuda:1, mps; checked before any work starts")


def show_progress(args) -> bool | None:
    """tqdm's ``disable`` argument for a command's progress bars: None (a bar only on a terminal, which
    tqdm decides from the stream) unless ``--quiet``, then True."""
    return True if getattr(args, "quiet", False) else None


def progress_bar(iterable, quiet: bool = False, **kwargs):
    """A tqdm bar on stderr that draws only on a terminal (never frames in a log) and never with ``quiet``."""
    from tqdm.auto import tqdm

    return tqdm(iterable, disable=True if quiet else None, file=sys.stderr, **kwargs)
