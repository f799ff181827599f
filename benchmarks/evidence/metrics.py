"""Score every selector on every run and aggregate: gap to the oracle, beats-last, correlations, ranks.

Everything here reads the test accuracy, so it is evaluation only; selectors never see its output.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from valfree.selection import correlations, gap_to_oracle

from . import checks
from .selectors import Run, Selector

# Signals whose correlation with test accuracy is tabulated (sign: the direction that means "good").
CORRELATED = {
    "hg_grad_norm": -1, "hg_score_w": -1, "hg_score_z": -1, "hg_entropy": -1, "hg_confidence": 1, "hg_margin": 1,
    "pseudo_grad_norm": -1, "tpv_trace": -1, "ww_alpha": -1, "train_loss": -1,
}
HEADLINE_SIGNAL = "hg_grad_norm"


def evaluate_runs(runs: list[Run], selectors: list[Selector], expected_checkpoints: int | None = None) -> dict:
    """Per-run choices and gaps for every selector that the run has the signals for, plus correlations."""
    for sel in selectors:
        checks.check_selector_responds(sel)
    per_run = {}
    oracle_choice = {}
    for run in runs:
        checks.check_trajectory(run, expected_checkpoints)
        acc = run.test_acc()
        chosen = {}
        for sel in selectors:
            if not sel.available(run):
                if run.carried and sel.name in run.carried["chosen"]:  # reported before; its input is not in the curves
                    chosen[sel.name] = dict(run.carried["chosen"][sel.name])
                continue
            for key in sel.needs or ((sel.signal,) if sel.signal else ()):
                checks.check_signal(run, key)
            idx = sel.choose(run, runs)
            chosen[sel.name] = {
                "index": int(idx), "step": float(run.steps[idx]), "test_acc": float(acc[idx]),
                "gap": 100 * gap_to_oracle(idx, acc, True),
            }
        checks.check_oracle(run, chosen["oracle"]["index"])
        oracle_choice[run.name] = chosen["oracle"]["index"]
        corr = {}
        for key in CORRELATED:
            x = run.series(key)
            if not np.isfinite(x).all():
                continue
            c = correlations(x, acc)
            if key == HEADLINE_SIGNAL:
                checks.check_correlation(run, key, c.spearman)
            corr[key] = {"pearson": c.pearson, "spearman": c.spearman, "kendall": c.kendall, "n": c.n}
        if HEADLINE_SIGNAL not in corr:
            raise checks.EvidenceError(f"{run.name}: the head-gradient signal is missing")
        per_run[run.name] = {"family": run.family, "regime": run.regime, "seed": run.seed, "chosen": chosen, "correlations": corr}
    checks.check_grid_discriminates(runs, oracle_choice)
    return per_run


def _mean_std(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


def summarise(per_run: dict, selectors: list[Selector]) -> dict:
    """Aggregates per (selector, family, regime), per (selector, regime), and overall with ranks."""
    names = [s.name for s in selectors]
    cells = defaultdict(lambda: defaultdict(list))  # (selector, family, regime) -> field -> values
    ranks = defaultdict(list)
    for run_name, rec in per_run.items():
        chosen = rec["chosen"]
        last_gap = chosen["last"]["gap"]
        val_gap = chosen.get("val500", {}).get("gap")
        contenders = [n for n in names if n in chosen and n != "oracle"]
        gaps = np.array([chosen[n]["gap"] for n in contenders])
        # Average rank among the selectors (1 = smallest gap; ties share the mean rank).
        from scipy.stats import rankdata

        for n, r in zip(contenders, rankdata(gaps)):
            ranks[n].append(float(r))
        for n in contenders:
            g = chosen[n]["gap"]
            for key in ((n, rec["family"], rec["regime"]), (n, "all", rec["regime"]), (n, "all", "all")):
                cell = cells[key]
                cell["gap"].append(g)
                cell["beats_last"].append(float(g < last_gap - 1e-9))
                cell["ties_last"].append(float(abs(g - last_gap) <= 1e-9))
                if val_gap is not None:
                    cell["beats_val500"].append(float(g < val_gap - 1e-9))
                    cell["at_least_val500"].append(float(g <= val_gap + 1e-9))
    table = {}
    for (n, fam, reg), cell in cells.items():
        m, s = _mean_std(cell["gap"])
        table[f"{n}|{fam}|{reg}"] = {
            "selector": n, "family": fam, "regime": reg, "n": len(cell["gap"]),
            "gap_mean": m, "gap_std": s, "gap_median": float(np.median(cell["gap"])),
            "beats_last": float(np.mean(cell["beats_last"])), "ties_last": float(np.mean(cell["ties_last"])),
            "beats_val500": float(np.mean(cell["beats_val500"])) if cell["beats_val500"] else float("nan"),
            "at_least_val500": float(np.mean(cell["at_least_val500"])) if cell["at_least_val500"] else float("nan"),
        }
    overall = sorted(
        ({"selector": n, "mean_rank": float(np.mean(ranks[n])), **{k: table[f"{n}|all|all"][k] for k in ("gap_mean", "gap_std", "gap_median", "beats_last", "beats_val500", "n")}}
         for n in names if f"{n}|all|all" in table and n != "oracle"),
        key=lambda row: (row["gap_mean"], row["mean_rank"]),
    )
    for row in overall:
        if not np.isfinite(row["gap_mean"]):
            raise checks.EvidenceError(f"selector {row['selector']!r} has a non-finite mean gap")
    return {"cells": table, "overall": overall}


def correlation_summary(per_run: dict) -> dict:
    """Mean ± std over seeds of each signal's Pearson/Spearman/Kendall with test accuracy, per family and regime."""
    groups = defaultdict(lambda: defaultdict(list))
    for rec in per_run.values():
        for key, c in rec["correlations"].items():
            for fam, reg in ((rec["family"], rec["regime"]), ("all", rec["regime"]), ("all", "all")):
                for stat in ("pearson", "spearman", "kendall"):
                    if np.isfinite(c[stat]):
                        groups[(key, fam, reg)][stat].append(c[stat])
    out = {}
    for (key, fam, reg), stats in groups.items():
        row = {"signal": key, "family": fam, "regime": reg}
        for stat, values in stats.items():
            row[f"{stat}_mean"], row[f"{stat}_std"] = _mean_std(values)
            row["n"] = len(values)
        out[f"{key}|{fam}|{reg}"] = row
    return out
