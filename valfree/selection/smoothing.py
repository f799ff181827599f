"""Smoothing a score series before it is used to choose."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def ema_step(state: float, value: float, span: float = 3) -> float:
    """One step of the recurrence of :func:`ema`: the smoothed value after ``state`` sees ``value``.

    ``state`` is NaN before the first finite value. A non-finite ``value`` leaves the state unchanged
    (the caller records NaN for that entry). Online trackers call this instead of recomputing the series.
    """
    if not math.isfinite(value):
        return state
    if span is None or span <= 1 or math.isnan(state):
        return float(value)
    alpha = 2.0 / (span + 1.0)
    return alpha * value + (1 - alpha) * state


def ema(values: Sequence[float], span: float = 3) -> np.ndarray:
    """Exponential moving average with span ``k``: alpha = 2 / (k + 1), s_0 = x_0.

    s_t = alpha x_t + (1 - alpha) s_{t-1}, as ``pandas.Series.ewm(span=k, adjust=False)``. Non-finite
    values are skipped: the average carries over them and their own smoothed entry is NaN, so they can
    never be chosen. ``span <= 1`` returns the series unchanged (non-finite entries as NaN).
    """
    x = np.asarray(values, dtype=float)
    out = np.full_like(x, np.nan)
    state = math.nan
    for i, v in enumerate(x.tolist()):
        if math.isfinite(v):
            state = ema_step(state, v, span)
            out[i] = state
    return out
