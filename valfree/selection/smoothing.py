"""Smoothing a score series before it is used to choose."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def ema(values: Sequence[float], span: float = 3) -> np.ndarray:
    """Exponential moving average with span ``k``: alpha = 2 / (k + 1), s_0 = x_0.

    s_t = alpha x_t + (1 - alpha) s_{t-1}, as ``pandas.Series.ewm(span=k, adjust=False)``. Non-finite
    values are skipped: the average carries over them and their own smoothed entry is NaN, so they can
    never be chosen. ``span <= 1`` returns the series unchanged (non-finite entries as NaN).
    """
    x = np.asarray(values, dtype=float)
    out = np.full_like(x, np.nan)
    if span is None or span <= 1:
        finite = np.isfinite(x)
        out[finite] = x[finite]
        return out
    alpha = 2.0 / (span + 1.0)
    state = math.nan
    for i, v in enumerate(x):
        if not math.isfinite(v):
            continue
        state = v if math.isnan(state) else alpha * v + (1 - alpha) * state
        out[i] = state
    return out
