"""The Label Wave point and the selection rules on hand-made series."""

import math

import numpy as np
import pytest

from valfree.errors import ValfreeError
from valfree.probes.prediction_changes import label_agreement, paired_difference_stderr, prediction_changes
from valfree.selection.label_wave import label_wave_point
from valfree.selection.rules import RULES, _Run, agreement_gain, memorisation_warning, memorised_fraction, select_by_rule


def test_late_minimum_is_found_and_confirmed():
    pc = [math.nan, 0.30, 0.20, 0.12, 0.08, 0.05, 0.04, 0.06, 0.09, 0.12, 0.14, 0.15, 0.15]
    wave = label_wave_point(pc, window=1, patience=3, start=2)
    assert wave.index == 6 and wave.stopped_at == 9


def test_early_oscillation_before_start_is_ignored():
    # a dip at index 1 (high learning rate, BatchNorm) followed by a rise, then the real minimum later
    pc = [math.nan, 0.05, 0.25, 0.20, 0.15, 0.10, 0.06, 0.04, 0.07, 0.10, 0.12]
    assert label_wave_point(pc, window=1, patience=2, start=0).index == 1
    assert label_wave_point(pc, window=1, patience=2, start=2).index == 7


def test_no_minimum_means_the_series_ends_first():
    falling = [math.nan] + list(np.linspace(0.3, 0.01, 12))
    wave = label_wave_point(falling, window=3, patience=0.2, start=2)
    assert wave.index == len(falling) - 1 and wave.stopped_at is None
    rising = [math.nan] + list(np.linspace(0.01, 0.3, 12))
    wave = label_wave_point(rising, window=1, patience=3, start=2)
    assert wave.index == 2 and wave.stopped_at == 5


def test_trailing_mean_is_the_papers_moving_average():
    from valfree.selection.label_wave import trailing_mean

    np.testing.assert_allclose(trailing_mean([math.nan, 3, 6, 9, math.nan, 12], 2), [math.nan, 3, 4.5, 7.5, math.nan, 10.5])


def test_patience_as_fraction_of_the_run():
    pc = [math.nan] + [0.1] * 19
    assert label_wave_point(pc, window=1, patience=0.2, start=2).patience == 4


def test_stop_never_looks_past_the_patience():
    # the same prefix gives the same choice, whatever comes later: the rule is an online stopper
    prefix = [math.nan, 0.3, 0.2, 0.1, 0.15, 0.2, 0.25]
    a = label_wave_point(prefix + [0.3, 0.3], window=1, patience=3, start=2)
    b = label_wave_point(prefix + [0.0, 0.0], window=1, patience=3, start=2)
    assert a.index == b.index == 3


def test_a_plateau_drifting_within_noise_is_confirmed_only_with_significance():
    # PC falls, then drifts down by 0.001 per checkpoint (a decaying learning rate while the model
    # memorises): every drift is a new plain minimum, so the patience never runs out; with the subset
    # size known the drifts are within noise and the first point of the plateau is confirmed.
    pc = [math.nan, 0.30, 0.20, 0.12] + [0.119 - 0.001 * t for t in range(16)]
    plain = label_wave_point(pc, window=1, patience=4, start=2)
    assert plain.stopped_at is None and plain.index == len(pc) - 1
    significant = label_wave_point(pc, window=1, patience=4, start=2, subset_size=2048)
    assert significant.index == 3 and significant.stopped_at == 7


def test_a_clear_new_minimum_stays_a_minimum_with_significance():
    pc = [math.nan, 0.30, 0.20, 0.12, 0.08, 0.05, 0.04, 0.06, 0.09, 0.12, 0.14, 0.15, 0.15]
    assert label_wave_point(pc, window=1, patience=3, start=2, subset_size=4096).index == 6


def test_significant_drop_is_the_monte_carlo_spread_of_a_smoothed_difference():
    # n elements flip independently with probability p at each checkpoint; the difference of two
    # trailing means over w checkpoints has the standard deviation significant_drop / 1.96.
    from valfree.selection.label_wave import MINIMUM_Z, significant_drop, trailing_mean

    rng = np.random.default_rng(0)
    n, p, w, draws = 2048, 0.1, 3, 4000
    flips = rng.binomial(n, p, size=(draws, 2 * w)) / n
    diffs = np.array([trailing_mean(f[:w], w)[-1] - trailing_mean(f[w:], w)[-1] for f in flips])
    sd = diffs.std(ddof=1)
    expected = significant_drop(p, n, w) / MINIMUM_Z
    # the sample sd of 4000 draws has a relative standard error of 1 / sqrt(2 (draws - 1)) ~ 1.1 %
    assert abs(sd - expected) < 4 * expected / math.sqrt(2 * (draws - 1))
    assert significant_drop(p, None, w) == 0.0


def test_guarded_rule_option_selects_the_significant_wave():
    pc = np.array([math.nan, 0.30, 0.20, 0.12] + [0.119 - 0.001 * t for t in range(16)])
    n = len(pc)
    steps = np.arange(1, n + 1) * 10.0
    la = np.concatenate([np.linspace(0.5, 0.62, 4), np.linspace(0.63, 0.95, n - 4)])
    cols = {"grad_norm": np.linspace(2.0, 0.5, n), "pred_change": pc, "label_agreement": la, "pred_subset": np.full(n, 2048)}
    assert select_by_rule("guarded", steps, cols, significant=False, patience=4).guard_fired is False
    sig = select_by_rule("guarded", steps, cols, significant=True, patience=4)
    # the 3-checkpoint moving average reaches the plateau at index 5 (0.12, 0.119, 0.118)
    assert sig.guard_fired is True and sig.index == 5
    # label-wave stays the paper's plain minimum unless asked
    assert select_by_rule("label-wave", steps, cols, patience=4).index == n - 1


def _noisy_run(n=20, m=7):
    steps = np.arange(1, n + 1) * 100.0
    probe = np.linspace(2.0, 0.5, n)  # the probe keeps falling while the model memorises
    pc = np.array([math.nan] + [0.3 * 0.7 ** t for t in range(1, m + 1)] + [0.02 + 0.01 * t for t in range(1, n - m)])
    la = np.concatenate([np.linspace(0.4, 0.62, m + 1), np.linspace(0.63, 0.9, n - m - 1)])
    return steps, {"grad_norm": probe, "pred_change": pc, "label_agreement": la, "pred_subset": np.full(n, 4096)}


def _clean_run(n=20):
    steps = np.arange(1, n + 1) * 100.0
    probe = np.linspace(2.0, 0.5, n)
    pc = np.array([math.nan] + list(0.3 * 0.8 ** np.arange(1, n)))
    la = 0.9 - 0.5 * 0.7 ** np.arange(n)
    return steps, {"grad_norm": probe, "pred_change": pc, "label_agreement": la, "pred_subset": np.full(n, 4096)}


def test_guard_fires_on_memorisation_and_chooses_the_wave_point():
    steps, cols = _noisy_run()
    choice = select_by_rule("guarded", steps, cols)
    assert choice.guard_fired is True
    assert choice.step == choice.wave_step < choice.probe.step
    assert "guard fired" in choice.reason


def test_guard_is_quiet_on_clean_learning():
    steps, cols = _clean_run()
    choice = select_by_rule("guarded", steps, cols)
    assert choice.guard_fired is False
    assert choice.step == select_by_rule("probe", steps, cols).step


def test_guard_without_pc_columns_falls_back_to_the_probe():
    steps, cols = _noisy_run()
    only_probe = {"grad_norm": cols["grad_norm"]}
    choice = select_by_rule("guarded", steps, only_probe)
    assert choice.guard_fired is None and choice.step == select_by_rule("probe", steps, only_probe).step
    with pytest.raises(ValfreeError, match="pred_change"):
        select_by_rule("label-wave", steps, only_probe)


def test_rules_accept_steps_in_any_order():
    steps, cols = _noisy_run()
    perm = np.random.default_rng(0).permutation(len(steps))
    shuffled = {k: np.asarray(v)[perm] for k, v in cols.items()}
    for rule in RULES:
        a = select_by_rule(rule, steps, cols)
        b = select_by_rule(rule, steps[perm], shuffled)
        assert a.step == b.step
        assert steps[perm][b.index] == b.step


def test_label_wave_reads_no_label():
    steps, cols = _noisy_run()
    base = select_by_rule("label-wave", steps, cols)
    for trap in (np.zeros(len(steps)), np.full(len(steps), np.nan), -cols["label_agreement"]):
        assert select_by_rule("label-wave", steps, {**cols, "label_agreement": trap}).step == base.step
    no_labels = {k: v for k, v in cols.items() if k != "label_agreement"}
    assert select_by_rule("label-wave", steps, no_labels).step == base.step


def test_gain_stderr_bound_covers_the_exact_paired_stderr():
    rng = np.random.default_rng(1)
    n = 2000
    given = rng.integers(0, 5, n)
    before = np.where(rng.random(n) < 0.6, given, (given + 1) % 5)
    after = before.copy()
    flip = rng.random(n) < 0.2  # these elements change prediction between the two checkpoints
    after[flip] = np.where(rng.random(flip.sum()) < 0.7, given[flip], (given[flip] + 2) % 5)
    preds = np.stack([before, after])
    la = label_agreement(preds, given)
    pc = prediction_changes(preds)
    run = _Run([0, 1], {"label_agreement": la, "pred_change": pc})
    est = agreement_gain(run, 0, 1, n)
    a, b = preds[1] == given, preds[0] == given
    exact = paired_difference_stderr(float(np.mean(a & ~b)), float(np.mean(~a & b)), n)
    assert est.value == pytest.approx(la[1] - la[0])
    assert exact <= est.stderr + 1e-12
    assert est.stderr <= 1.5 * exact  # the bound is not loose when most changes move agreement


def test_memorised_fraction_tracks_the_late_gain():
    steps, cols = _noisy_run()
    est, wave_step = memorised_fraction(steps, cols)
    wave = select_by_rule("label-wave", steps, cols)
    la = cols["label_agreement"]
    assert wave_step == wave.step
    assert est.value == pytest.approx(la[-1] - la[wave.index])
    assert est.low < est.value < est.high
    warning = memorisation_warning(est, wave_step)
    assert "memorised wrong labels" in warning and f"step {wave_step:g}" in warning
    clean_steps, clean = _clean_run()
    assert memorisation_warning(*memorised_fraction(clean_steps, clean)) is None


def test_unknown_rule_and_option_are_one_sentence():
    steps, cols = _clean_run()
    with pytest.raises(ValfreeError, match="unknown rule"):
        select_by_rule("nope", steps, cols)
    with pytest.raises(ValfreeError, match="unknown rule option"):
        select_by_rule("probe", steps, cols, bogus=1)


def test_select_checkpoint_takes_a_rule_and_its_columns():
    from valfree import select_checkpoint

    steps, cols = _noisy_run()
    choice = select_checkpoint(steps, cols["grad_norm"], rule="guarded", pred_change=cols["pred_change"],
                               label_agreement=cols["label_agreement"], pred_subset=cols["pred_subset"])
    assert choice.step == select_by_rule("guarded", steps, cols).step and choice.guard_fired
    assert select_checkpoint(steps, cols["grad_norm"]).step == choice.probe.step
    with pytest.raises(ValfreeError, match="pass rule="):
        select_checkpoint(steps, cols["grad_norm"], pred_change=cols["pred_change"])
