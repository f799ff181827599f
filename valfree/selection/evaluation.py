"""Evaluation-only statistics. These read held-out metrics and are never used to choose."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

from ..errors import ValfreeError


@dataclass
class Correlations:
    """Pearson, Spearman and Kendall correlations of a score with a held-out metric, with p-values."""

    pearson: float
    pearson_p: float
    spearman: float
    spearman_p: float
    kendall: float
    kendall_p: float
    n: int

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def correlations(scores: Sequence[float], metric: Sequence[float]) -> Correlations:
    """Correlations over the points where both the score and the metric are finite."""
    x = np.asarray(scores, dtype=float)
    y = np.asarray(metric, dtype=float)
    if x.shape != y.shape:
        raise ValfreeError(f"scores and metric must have equal length, got {len(x)} and {len(y)}.")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        nan = float("nan")
        return Correlations(nan, nan, nan, nan, nan, nan, int(len(x)))
    p = stats.pearsonr(x, y)
    s = stats.spearmanr(x, y)
    k = stats.kendalltau(x, y)
    return Correlations(
        float(p.statistic), float(p.pvalue), float(s.statistic), float(s.pvalue),
        float(k.statistic), float(k.pvalue), int(len(x)),
    )


def gap_to_oracle(chosen_index: int, metric: Sequence[float], higher_is_better: bool = True) -> float:
    """How much worse the chosen checkpoint's metric is than the best one's (>= 0)."""
    y = np.asarray(metric, dtype=float)
    if not np.isfinite(y).any():
        raise ValfreeError("the held-out metric has no finite value, so the gap to the oracle is undefined.")
    best = np.nanmax(y) if higher_is_better else np.nanmin(y)
    chosen = y[chosen_index]
    return float(best - chosen) if higher_is_better else float(chosen - best)
