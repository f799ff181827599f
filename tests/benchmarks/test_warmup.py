"""The warm-up benchmark's replay stops where a callback would, on runs whose stop is computed by hand."""

import math

import pytest

from benchmarks.warmup import decide, measure, replay, summarise

NAN = math.nan


def test_probe_stops_patience_checks_after_the_smoothed_minimum():
    cols = {"grad_norm": [5.0, 4.0, 3.0, 2.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0]}
    # EMA of span 3 (alpha 1/2): 5, 4.5, 3.75, 2.875, 1.9375, 1.96875, 2.48, 3.24, ...; the minimum is
    # check 5, and checks 6, 7, 8 do not improve on it: patience 3 runs out at check 8. The restored
    # checkpoint is the smoothed minimum of the last 20 % of 8 checks (checks 7 and 8): check 7.
    assert replay(cols, "probe", 0, patience=3) == (8, 6)
    # A warm-up of 10 checks: the patience counts from check 11, whose smoothed score becomes the best;
    # check 12 does not improve on it and the run ends first. The tail (checks 10-12) chooses check 10.
    assert replay(cols, "probe", 10, patience=3) == (12, 9)
    # As a fraction of the 12 expected checks: 0.2 -> 3 checks, which does not bind (the minimum at
    # check 5 comes after it); 0.75 -> 9 checks, the patience counts from check 10 and never runs out.
    assert replay(cols, "probe", 0.2, patience=3) == (8, 6)
    assert replay(cols, "probe", 0.75, patience=3) == (12, 9)
    # Without early stopping the run takes all 12 checks, and the tail (checks 10-12) chooses check 10.
    assert replay(cols, "probe", 0.2, patience=None) == (12, 9)


def test_probe_patience_counts_from_the_end_of_the_warmup():
    # A probe that only rises is lowest at check 1: with no warm-up, patience 3 runs out at check 4.
    # After a warm-up the patience starts again from the first check after it: 3 warm-up checks stop the
    # run at check 7 (tail: checks 6-7, choosing 6), 6 warm-up checks at check 10 (tail 9-10, choosing 9).
    cols = {"grad_norm": [1.0 + i for i in range(12)]}
    assert replay(cols, "probe", 0, patience=3) == (4, 3)
    assert replay(cols, "probe", 3, patience=3) == (7, 5)
    assert replay(cols, "probe", 0.5, patience=3) == (10, 8)


def memorising_run() -> dict:
    """Prediction changes bottom out at check 6 (trailing mean of 3: 0.5 0.4 0.3 0.15 0.067 0.1 0.18
    ...), then rise while label agreement climbs from 0.6 to 0.95: memorisation. The probe keeps
    falling, so only the guard can stop the run."""
    return {
        "grad_norm": [12.0 - i for i in range(12)],
        "pred_change": [NAN, 0.5, 0.3, 0.1, 0.05, 0.05, 0.2, 0.3, 0.4, 0.4, 0.4, 0.4],
        "label_agreement": [0.5, 0.55, 0.6, 0.6, 0.6, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92, 0.95],
        "pred_subset": [10000.0] * 12,
    }


def test_guarded_stops_when_the_wave_point_is_confirmed_and_the_guard_fires():
    cols = memorising_run()
    # At check 8 the Label Wave patience (20 % of 8 checks, rounded up: 2) has run out on the minimum at
    # check 6; the probe's choice (check 8) comes after it with 0.2 more label agreement, whose lower
    # bound (0.2 - 1.96 sqrt((0.5 - 0.04) / 10000) = 0.187) is >= 0.05, and 1 - 0.6 - 0.067 = 0.33 of
    # the subset was steadily rejected there: the guard fires and the run stops, keeping check 6.
    assert replay(cols, "guarded", 0, patience=10) == (8, 5)
    assert replay(cols, "guarded", 0.2, patience=10) == (8, 5)  # 3 warm-up checks of 12: no effect
    assert replay(cols, "guarded", 9, patience=10) == (10, 5)  # held back to check 10, same choice
    # The probe alone never stalls on a falling series.
    assert replay(cols, "probe", 0, patience=10) == (12, 11)


def test_measure_counts_premature_stops_and_gaps_in_points():
    accuracy = [0.5 + 0.01 * i for i in range(12)]  # best at the last check
    curve = {"hg_grad_norm": [1.0 + i for i in range(12)], "test_acc": accuracy,
             "pred_change": [NAN] * 12, "label_agreement": [NAN] * 12}
    evidence = {"curves": {"a": curve}, "per_run": {"a": {"regime": "noisy"}}, "run_meta": [{"name": "a"}]}
    rows = {(r["rule"], r["warmup"]): r for r in measure(evidence, patience=3)}
    row = rows[("probe", "none")]
    assert (row["checks"], row["chosen"], row["best"], row["premature"], row["noisy"]) == (4, 3, 11, True, True)
    assert row["gap"] == pytest.approx(8.0)  # 0.61 - 0.53
    full = rows[("probe", "no early stopping")]  # all 12 checks; the tail (checks 10-12) chooses check 10
    assert (full["checks"], full["chosen"], full["premature"]) == (12, 9, False)
    assert full["gap"] == pytest.approx(2.0)
    summary = summarise(list(rows.values()))
    assert summary["probe"]["none"]["noisy"]["premature"] == 1.0


def test_decision_keeps_the_current_warmup_when_nothing_differs():
    def cell(gap):
        return {g: {"runs": 2, "premature": 0.0, "gap": gap, "gap_se": 0.0, "checks": 20.0} for g in ("clean", "noisy", "all")}

    same = {rule: {label: cell(1.0) for label in ("no early stopping", "none", "0.1", "0.2", "0.3", "3 checks")}
            for rule in ("guarded", "probe")}
    decision = decide(same)
    assert all(decision["passes"].values())
    assert decision["default"] == 0.2  # 'none' passes too, but saves no check
