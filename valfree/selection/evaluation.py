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


def gap_to_oracle(chosen, metric: Sequence[float], higher_is_better: bool = True, *,
                  steps: Sequence[float] | None = None) -> float:
    """How much worse the chosen checkpoint's metric is than the best one's (>= 0), in the metric's units.

    ``chosen`` is the :class:`~valfree.selection.Selection` that :func:`select_checkpoint` returned, or
    the chosen checkpoint's position in ``metric``; with ``steps`` (the step of each metric value), it
    is the chosen checkpoint's step instead. NaN metric values (checkpoints without a metric) are
    skipped for the best one.
    """
    y = np.asarray(metric, dtype=float)
    if y.ndim != 1 or y.size == 0:
        raise ValfreeError("the held-out metric must be a non-empty sequence of numbers, one per checkpoint.")
    if not np.isfinite(y).any():
        raise ValfreeError("the held-out metric has no finite value, so the gap to the oracle is undefined.")
    index = _chosen_index(chosen, len(y), steps)
    best = np.nanmax(y) if higher_is_better else np.nanmin(y)
    value = y[index]
    return float(best - value) if higher_is_better else float(value - best)


def _chosen_index(chosen, n: int, steps) -> int:
    if chosen is None:
        raise ValfreeError("gap_to_oracle needs the chosen checkpoint: pass the Selection that select_checkpoint "
                           "returned, or its index.")
    if steps is not None:
        step = chosen.step if hasattr(chosen, "step") and hasattr(chosen, "smoothed") else chosen
        s = np.asarray(steps, dtype=float)
        if s.shape != (n,):
            raise ValfreeError(f"steps must hold one step per metric value ({n}), not {s.size}.")
        hits = np.flatnonzero(s == float(step))
        if not hits.size:
            raise ValfreeError(f"step {step:g} is not among the steps given with the metric.")
        return int(hits[0])
    # A Selection carries its index; anything else is taken as the index itself.
    index = chosen.index if hasattr(chosen, "step") and hasattr(chosen, "smoothed") else chosen
    if isinstance(index, (bool, np.bool_)) or not isinstance(index, (int, np.integer)):
        if isinstance(index, (float, np.floating)) and float(index).is_integer():
            index = int(index)
        else:
            raise ValfreeError(f"the chosen checkpoint must be a Selection or an index into the metric, not {index!r}.")
    if not -n <= int(index) < n:
        raise ValfreeError(f"the chosen index {int(index)} is outside the {n} metric values; pass the position of "
                           "the chosen checkpoint (Selection.index), or its step together with steps=.")
    return int(index)
