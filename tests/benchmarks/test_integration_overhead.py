"""The overhead benchmark's aggregation over rounds: medians, ranges, and the `every` it implies."""

import pytest

from benchmarks.integration_overhead import combine_rounds


def fake_round(step_ms: float, probe_ms: float, fixed_ms: float) -> dict:
    share = 100 * probe_ms / step_ms
    return {
        "step_ms_cpu": step_ms, "step_ms_wall": step_ms, "timed_step_pairs": 10,
        "piggyback": {
            "probe_ms_cpu": probe_ms, "probe_ms_wall": probe_ms, "percent_of_step_cpu": share,
            "percent_of_step_wall": share, "paired_difference_percent_cpu": share, "paired_difference_ci95_cpu": [0, 1],
            "paired_difference_percent_wall": share, "paired_difference_ci95_wall": [0, 1],
        },
        "fixed_batch": {"64": {
            "probe_ms_cpu": fixed_ms, "probe_ms_wall": fixed_ms, "percent_of_epoch_cpu": fixed_ms / step_ms,
            "percent_of_epoch_wall": fixed_ms / step_ms, "every_for_0.1_percent": fixed_ms / (0.001 * step_ms),
        }},
    }


def test_rounds_combine_to_medians_with_ranges():
    rounds = [fake_round(100, 0.8, 20), fake_round(120, 0.8, 21), fake_round(90, 0.9, 19)]
    r = combine_rounds(rounds)
    assert r["step_ms_cpu"] == 100 and r["step_ms_cpu_range"] == [90, 120]
    assert r["piggyback"]["percent_of_step_cpu"] == pytest.approx(0.8)
    assert r["piggyback"]["percent_of_step_cpu_range"] == pytest.approx([100 * 0.8 / 120, 100 * 0.9 / 90])
    cell = r["fixed_batch"]["by_probe_batch"]["64"]
    assert cell["probe_ms_cpu"] == 20
    assert cell["every_for_0.1_percent"] == 200  # the median of 200, 175 and 211.1, rounded up
    assert r["fixed_batch"]["target_percent_of_epoch"] == 0.1 and r["piggyback"]["target_percent_of_step"] == 1.0
