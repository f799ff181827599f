"""From a score series to a chosen checkpoint: EMA smoothing, a tail window, and the argmin."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from ..errors import ValfreeError
from . import smoothing

# Directions of a score: "min" chooses its smallest smoothed value, "max" its largest.
MODES = ("min", "max")
# The paper's universal preset: last 20 % of the trajectory, EMA span 3, minimise the head gradient.
UNIVERSAL_PRESET = {"tail": 0.2, "ema": 3, "mode": "min"}


@dataclass
class Selection:
    """The choice and everything needed to show why it was made.

    ``index`` is the position in the input series, ``step`` its step and ``score`` its smoothed
    score. ``window`` is the half-open index range [start, stop) that was searched, ``smoothed`` the
    whole smoothed series, and ``invalid`` the indices whose raw score was NaN or infinite.
    """

    index: int
    step: float
    score: float
    raw_score: float
    window: tuple[int, int]
    smoothed: np.ndarray
    invalid: list[int] = field(default_factory=list)
    mode: str = "min"
    tail: float = 0.2
    ema: float = 3

    def as_dict(self) -> dict:
        return {
            "index": self.index,
            "step": self.step,
            "score": self.score,
            "raw_score": self.raw_score,
            "window": list(self.window),
            "invalid": list(self.invalid),
            "mode": self.mode,
            "tail": self.tail,
            "ema": self.ema,
        }


def tail_window(n: int, tail: float | int) -> tuple[int, int]:
    """The index range [start, n) of the tail: a fraction in (0, 1] of the series, or a count >= 1.

    A float is a fraction (``1.0`` is the whole series); an int is a number of points. The window
    always holds at least one point.
    """
    if n <= 0:
        raise ValfreeError("the score series is empty, so there is nothing to select.")
    if isinstance(tail, bool) or tail is None:
        raise ValfreeError(f"tail must be a fraction in (0, 1] or a count >= 1, not {tail!r}.")
    if isinstance(tail, (int, np.integer)):
        if tail < 1:
            raise ValfreeError(f"a tail count must be at least 1, not {tail}.")
        return max(0, n - int(tail)), n
    if not (0 < tail <= 1):
        raise ValfreeError(f"a tail fraction must lie in (0, 1], not {tail}; pass an integer for a count.")
    size = max(1, math.ceil(tail * n - 1e-9))
    return n - size, n


def select_checkpoint(
    steps: Sequence[float],
    scores: Sequence[float],
    tail: float | int = 0.2,
    ema: float = 3,
    mode: str = "min",
    rule: str | None = None,
    **columns,
):
    """Choose a checkpoint from a score series without labels.

    Sort by step, smooth with an EMA of span ``ema``, restrict to the ``tail`` window (a fraction of
    the series or a count of points), and take the argmin (``mode="min"``, for the head gradient and
    other lower-is-better signals) or argmax (``mode="max"``). NaN or infinite scores are never chosen
    and are listed in ``invalid``. The defaults are the paper's universal preset.

    ``rule`` names one of :data:`valfree.selection.rules.RULES` (e.g. ``"guarded"``, ``"label-wave"``);
    the series it reads beyond the probe's come as keyword columns (``pred_change=``,
    ``label_agreement=``, ``pred_subset=``), aligned with ``steps``, and the result is then a
    :class:`~valfree.selection.rules.RuleChoice` (``index``, ``step``, ``reason``, the probe's own
    :class:`Selection` as ``probe``). Without ``rule`` this is the probe's preset and returns a
    :class:`Selection`.
    """
    if rule is not None:
        from .rules import select_by_rule  # rules builds on this function

        return select_by_rule(rule, steps, {"grad_norm": scores, **columns}, tail=tail, ema=ema, mode=mode)
    if columns:
        raise ValfreeError(f"columns {', '.join(sorted(columns))} are read only by a rule; pass rule=... as well.")
    if mode not in MODES:
        raise ValfreeError(f"mode must be 'min' or 'max', not {mode!r}.")
    s = np.asarray(steps, dtype=float)
    x = np.asarray(scores, dtype=float)
    if s.shape != x.shape or s.ndim != 1:
        raise ValfreeError(f"steps and scores must be 1-D and of equal length, got {s.shape} and {x.shape}.")
    order = np.argsort(s, kind="stable")
    s_sorted, x_sorted = s[order], x[order]
    smoothed = smoothing.ema(x_sorted, ema)
    start, stop = tail_window(len(x_sorted), tail)
    window = smoothed[start:stop]
    if not np.isfinite(window).any():
        raise ValfreeError(
            f"every score in the tail window (points {start} to {stop - 1}) is NaN or infinite; "
            "check the failed rows, or widen the window with a larger tail."
        )
    signed = window if mode == "min" else -window
    local = int(np.nanargmin(np.where(np.isfinite(signed), signed, np.nan)))
    pos = start + local
    invalid = sorted(int(order[i]) for i in np.flatnonzero(~np.isfinite(x_sorted)))
    smoothed_in_input_order = np.empty_like(smoothed)
    smoothed_in_input_order[order] = smoothed
    return Selection(
        index=int(order[pos]),
        step=float(s_sorted[pos]),
        score=float(smoothed[pos]),
        raw_score=float(x_sorted[pos]),
        window=(start, stop),
        smoothed=smoothed_in_input_order,
        invalid=invalid,
        mode=mode,
        tail=tail,
        ema=ema,
    )

