"""Assertions that make the headline figures fail loudly if the pipeline silently breaks.

Each raises :class:`EvidenceError` with the run and the selector or signal at fault: an empty or
truncated trajectory, a constant or non-finite metric or signal, a NaN correlation, a selector that
ignores its input (returns a constant), an oracle that is not the best.
"""

from __future__ import annotations

import math

import numpy as np

from .selectors import Run, Selector, defined_part


class EvidenceError(AssertionError):
    pass


def check_trajectory(run: Run, expected: int | None = None) -> None:
    if not run.rows:
        raise EvidenceError(f"{run.name}: the trajectory is empty")
    if expected is not None and len(run.rows) != expected:
        raise EvidenceError(f"{run.name}: {len(run.rows)} checkpoints, expected {expected}")
    acc = run.test_acc()
    if not np.isfinite(acc).all():
        raise EvidenceError(f"{run.name}: non-finite test accuracy")
    if np.ptp(acc) == 0:
        raise EvidenceError(f"{run.name}: test accuracy is constant over the trajectory ({acc[0]:.4f}); training did nothing")
    if list(run.steps) != sorted(run.steps):
        raise EvidenceError(f"{run.name}: checkpoints are not in step order")


def check_signal(run: Run, key: str) -> None:
    x = defined_part(key, run.series(key))
    if not np.isfinite(x).all():
        raise EvidenceError(f"{run.name}: signal {key!r} has {int((~np.isfinite(x)).sum())} non-finite values")
    if np.ptp(x) == 0:
        raise EvidenceError(f"{run.name}: signal {key!r} is constant ({x[0]!r}) over the trajectory")


def check_correlation(run: Run, key: str, value: float) -> None:
    if not math.isfinite(value):
        raise EvidenceError(f"{run.name}: correlation of {key!r} with test accuracy is NaN")


def _planted_run(n: int, signal: str | None, mode: str, best: int, needs=()) -> Run:
    """A synthetic run whose every series has a single sharp optimum at ``best`` (in the last 20 %)."""
    # A gentle improving trend plus a sharp optimum: whole-run and rank-based selectors then also
    # look in the tail, and the optimum is not at an end by accident.
    base = np.linspace(2.0, 1.0, n)
    rows = []
    for i in range(n):
        low = base[i] - (5.0 if i == best else 0.0)  # lower-is-better version, minimum at best
        row = {"step": float(i + 1), "test_acc": 0.5 + (0.3 if i == best else 0.0) + 0.001 * i}
        for key in {signal, *needs} - {None, "test_acc"}:
            row[key] = -low if mode == "max" and key == signal else low
        if "pred_change" in row and i == 0:
            row["pred_change"] = float("nan")  # PC_0 is undefined, as in a real run
        rows.append(row)
    return Run(f"planted@{best}", "synthetic", "synthetic", 0, rows)


def check_selector_responds(sel: Selector, n: int = 30) -> None:
    """A selector must move its choice when the optimum of its input moves: plant the optimum at two
    tail positions and require the two choices to differ. This catches a selector that returns a
    constant. (The 'last' baseline is constant by design and skipped.)"""
    if sel.constant_by_design:
        return
    choices = []
    for best in (n - 5, n - 2):
        run = _planted_run(n, sel.signal, sel.mode, best, sel.needs)
        choices.append(sel.choose(run, [run]))
    if choices[0] == choices[1]:
        raise EvidenceError(f"selector {sel.name!r} returned index {choices[0]} for optima planted at {n - 5} and {n - 2}: it ignores its input")


def check_oracle(run: Run, oracle_index: int) -> None:
    acc = run.test_acc()
    if acc[oracle_index] != np.nanmax(acc):
        raise EvidenceError(f"{run.name}: the oracle chose {oracle_index}, which is not the best checkpoint")


def check_grid_discriminates(runs: list[Run], oracle: dict[str, int]) -> None:
    """If the oracle were always the last checkpoint, no selector could beat 'last': flag it."""
    if all(oracle[r.name] == len(r.rows) - 1 for r in runs) and len(runs) > 3:
        raise EvidenceError("the best checkpoint is the last one in every run: the grid cannot tell selectors apart")
