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


def fake_predictions(step_ms: float, measure_ms: dict, observe_ms: float) -> dict:
    model = {"step_ms_cpu": step_ms, "observe_ms_cpu": observe_ms, "flush_ms_cpu": 0.0,
             "by_subset": {str(n): {"measure_ms_cpu": ms} for n, ms in measure_ms.items()}}
    cadences = [{"integration": "Monitor", "cadence": "every=100 steps", "steps_per_check": 100, "subset": 256},
                {"integration": "Lightning", "cadence": "every epoch", "steps_per_check": 469, "subset": 2048}]
    return {"by_model": {"cnn": model}, "cadences": cadences}


def test_prediction_tracking_shares_per_default_cadence():
    from benchmarks.integration_overhead import combine_predictions

    # 256 inputs cost one step and 2048 eight; 1200 is what training_pred_subset gives a 469-step epoch.
    rounds = [fake_predictions(100, {256: 100, 1200: 480, 2048: 800}, 0.5),
              fake_predictions(80, {256: 100, 1200: 480, 2048: 800}, 0.5)]
    pc = combine_predictions(rounds)
    monitor, lightning = pc["defaults"]
    assert pc["by_model"]["cnn"]["step_ms_cpu"] == 90
    assert monitor["fixed_percent_cpu"]["cnn"] == pytest.approx(100 * 100 / (100 * 90))
    assert monitor["fixed_percent_cpu_range"]["cnn"] == pytest.approx([1.0, 1.25])
    assert lightning["budgeted_subset"] == 1200
    assert lightning["fixed_percent_cpu"]["cnn"] == pytest.approx(100 * 800 / (469 * 90))
    assert lightning["budgeted_percent_cpu"]["cnn"] == pytest.approx(100 * 480 / (469 * 90))
    assert monitor["piggyback_percent_cpu"]["cnn"] == pytest.approx(100 * 0.5 / 90)
