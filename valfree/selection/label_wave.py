"""The Label Wave point: the first minimum of smoothed prediction changes, confirmed by a patience.

Label Wave (Yuan, Feng and Liu, ICLR 2025) observes that, with noisy labels, the fraction of training
inputs whose predicted class changes between checkpoints (PC, see
:mod:`valfree.probes.prediction_changes`) first falls while the model learns the clean patterns, then
rises again while it fits the mislabelled examples, whose predictions keep flipping. The first minimum
of PC comes just before that memorisation. The rule, as an early stopper read in step order:

1. smooth PC with a trailing moving average over ``window`` checkpoints, as the paper does (PC_0 is
   undefined and is skipped; the first entries average what exists so far);
2. from index ``start`` on, keep the index of the smallest smoothed PC seen so far (the earliest on
   ties);
3. stop as soon as ``patience`` checkpoints have passed without a new minimum; the choice is the
   minimum at that moment. A series that never stops chooses its minimum over [start, n).

A significant minimum. PC is a proportion measured on a subset of n elements, so each smoothed value
s_t carries sampling noise: Var(PC_t) = p (1 - p) / n, and a trailing mean over w checkpoints divides
that by w (the subset is the same at every checkpoint, but which elements flip is close to independent
from one checkpoint to the next). With ``subset_size`` given, a later value counts as a new minimum
only when it lies below the current one by more than the noise of their difference,

    s_i < s_m - z sqrt(2 s_m (1 - s_m) / (n w)),    z = 1.96,

the two-sample one-sided test at the 2.5 % level. Without it a plateau on which PC drifts down by a
few thousandths per checkpoint, as it does under a decaying learning rate while the model memorises,
keeps setting "new" minima that are within noise of each other, so the patience never runs out and no
point is ever confirmed. ``subset_size=None`` is the paper's rule: any decrease is a new minimum.

The official code starts at the third epoch and stops after 10 epochs without a new minimum. A folder
of checkpoints has no epochs, so ``start`` and ``patience`` are counts of checkpoints (int) or
fractions of the series (float in (0, 1]). Because step 3 is online, the choice never depends on
checkpoints after the stop: the same function serves early stopping during training and selection
from a finished run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from ..errors import ValfreeError

# Checkpoint-folder defaults: a 3-checkpoint moving average, start at the third checkpoint (the first
# two PCs are the steepest part of learning), patience a fifth of the run (10 of the official code's
# ~50 epochs).
LABEL_WAVE_DEFAULTS = {"window": 3, "patience": 0.2, "start": 2}
# One-sided 97.5 % normal quantile: the test a new minimum passes when the subset size is known.
MINIMUM_Z = 1.96


def trailing_mean(values: Sequence[float], window: int) -> np.ndarray:
    """s_t = mean of the last ``window`` finite values up to t; NaN where x_t itself is not finite
    (so a missing value is never chosen), and the first entries average what exists so far."""
    x = np.asarray(values, dtype=float)
    if isinstance(window, bool) or int(window) != window or window < 1:
        raise ValfreeError(f"the moving-average window must be a whole number >= 1, not {window!r}.")
    out = np.full_like(x, np.nan)
    recent: list[float] = []
    for i, v in enumerate(x.tolist()):
        if math.isfinite(v):
            recent = (recent + [v])[-int(window):]
            out[i] = sum(recent) / len(recent)
    return out


def as_count(value: float | int, n: int, what: str, minimum: int = 1) -> int:
    """A count of points from ``value``: an int is taken as it is, a float in (0, 1] as that fraction
    of ``n`` points (rounded up, at least ``minimum``)."""
    if isinstance(value, bool) or value is None:
        raise ValfreeError(f"{what} must be a count or a fraction in (0, 1], not {value!r}.")
    if isinstance(value, (int, np.integer)):
        if value < 0:
            raise ValfreeError(f"{what} must not be negative, got {value}.")
        return int(value)
    value = float(value)
    if not (0 < value <= 1):
        raise ValfreeError(f"{what} as a fraction must lie in (0, 1], not {value}; pass an integer for a count.")
    return max(minimum, math.ceil(value * n - 1e-9))


@dataclass
class WaveChoice:
    """Where the Label Wave rule lands, in step-sorted positions.

    ``index`` is the chosen position (the confirmed minimum), ``stopped_at`` the position at which the
    patience ran out (None if the series ended first), ``smoothed`` the smoothed PC series and
    ``patience`` / ``start`` the counts that were used.
    """

    index: int
    stopped_at: int | None
    smoothed: np.ndarray
    patience: int
    start: int

    @property
    def minimum(self) -> float:
        return float(self.smoothed[self.index])


def significant_drop(minimum: float, subset_size: int | None, window: int) -> float:
    """How far below ``minimum`` a smoothed PC must lie to count as a new minimum (module docstring);
    0 without a subset size."""
    if not subset_size:
        return 0.0
    p = min(max(float(minimum), 0.0), 1.0)
    return MINIMUM_Z * math.sqrt(2.0 * p * (1.0 - p) / (int(subset_size) * int(window)))


def label_wave_point(
    pred_change: Sequence[float], window: int = 3, patience: float | int = 0.2, start: float | int = 2,
    subset_size: int | None = None,
) -> WaveChoice:
    """Apply the Label Wave rule to a PC series already in step order (see the module docstring);
    with ``subset_size`` a new minimum must be significant."""
    pc = np.asarray(pred_change, dtype=float)
    if pc.ndim != 1 or len(pc) == 0:
        raise ValfreeError("the prediction-change series is empty, so there is no Label Wave point.")
    n = len(pc)
    wait = as_count(patience, n, "patience", minimum=1)
    if wait < 1:
        raise ValfreeError("patience must be at least one checkpoint.")
    first = as_count(start, n, "start", minimum=1) if not isinstance(start, (int, np.integer)) else int(start)
    if first < 0:
        raise ValfreeError(f"start must not be negative, got {start}.")
    smoothed = trailing_mean(pc, window)
    finite = np.flatnonzero(np.isfinite(smoothed))
    candidates = finite[finite >= first]
    if len(candidates) == 0:
        # Too short a series for the start: fall back to every finite point rather than refuse.
        candidates = finite
    if len(candidates) == 0:
        raise ValfreeError("every prediction-change value is NaN; were predictions recorded for two checkpoints or more?")
    best, stopped = int(candidates[0]), None
    for i in range(int(candidates[0]), n):
        if np.isfinite(smoothed[i]) and smoothed[i] < smoothed[best] - significant_drop(smoothed[best], subset_size, window):
            best = i
        if i - best >= wait:
            stopped = i
            break
    return WaveChoice(index=best, stopped_at=stopped, smoothed=smoothed, patience=wait, start=int(candidates[0]))
