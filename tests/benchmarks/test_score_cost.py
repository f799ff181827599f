"""The score-cost benchmark's arithmetic: per-checkpoint times from the loop, and shares."""

import pytest

from benchmarks.score_cost import summarise


def test_per_checkpoint_time_and_shares():
    # Start-up 1 s; a checkpoint costs 0.1 s with predictions off and 0.4 s with 2048 (wall = CPU here).
    n = 10
    repeat = {0: {"call": (2.0, 2.0), "loop": (1.0, 1.0)}, 2048: {"call": (5.2, 5.2), "loop": (4.0, 4.0)}}
    out = summarise([repeat, repeat], n, (0, 2048))
    assert out["per_checkpoint_ms"]["cpu"] == pytest.approx({"0": 100.0, "2048": 400.0})
    assert out["startup_s"]["cpu"] == pytest.approx({"0": 1.0, "2048": 1.2})
    assert out["share_per_checkpoint_percent"]["cpu"]["2048"]["median"] == pytest.approx(75.0)
    assert out["share_total_percent"]["cpu"]["2048"]["median"] == pytest.approx(100 * 3.2 / 5.2)
