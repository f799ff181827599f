import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from scipy import stats

import valfree
from valfree.selection import EarlyStopping, correlations, ema, gap_to_oracle, tail_window


def ema_reference(x, span):
    """pandas' ewm(span, adjust=False).mean() written out."""
    alpha = 2 / (span + 1)
    out = [x[0]]
    for v in x[1:]:
        out.append(alpha * v + (1 - alpha) * out[-1])
    return np.array(out)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=50), st.sampled_from([2, 3, 5, 10]))
def test_ema_matches_reference(values, span):
    np.testing.assert_allclose(ema(values, span), ema_reference(values, span), rtol=1e-12, atol=1e-9)


def test_ema_skips_non_finite_values():
    got = ema([1.0, math.nan, 3.0, math.inf], 3)
    assert got[0] == 1.0 and math.isnan(got[1]) and got[2] == pytest.approx(0.5 * 3 + 0.5 * 1) and math.isnan(got[3])


@pytest.mark.parametrize("n,tail,expected", [(10, 0.2, (8, 10)), (10, 0.25, (7, 10)), (10, 1.0, (0, 10)),
                                              (10, 3, (7, 10)), (10, 30, (0, 10)), (3, 0.01, (2, 3))])
def test_tail_window(n, tail, expected):
    assert tail_window(n, tail) == expected


@pytest.mark.parametrize("tail", [0, 0.0, -1, 1.5])
def test_tail_window_rejects_bad_values(tail):
    with pytest.raises(valfree.ValfreeError):
        tail_window(10, tail)


def test_select_is_argmin_of_smoothed_tail_and_sorts_by_step():
    steps = [50, 10, 40, 20, 30]
    scores = [5.0, 9.0, 1.0, 7.0, 3.0]
    sel = valfree.select_checkpoint(steps, scores, tail=2, ema=1)
    assert sel.step == 40 and sel.index == 2 and sel.window == (3, 5)
    sel_max = valfree.select_checkpoint(steps, scores, tail=2, ema=1, mode="max")
    assert sel_max.step == 50


def test_select_default_is_universal_preset():
    rng = np.random.default_rng(0)
    scores = np.linspace(2, 1, 30) + rng.normal(0, 0.05, 30)
    steps = np.arange(30)
    sel = valfree.select_checkpoint(steps, scores)
    smoothed = ema_reference(scores, 3)
    assert sel.window == (24, 30)
    assert sel.index == 24 + int(np.argmin(smoothed[24:]))
    np.testing.assert_allclose(sel.smoothed, smoothed)


def test_nan_and_inf_are_never_chosen_and_reported():
    steps = list(range(6))
    scores = [3.0, 2.0, 1.0, math.nan, -math.inf, 0.5]
    sel = valfree.select_checkpoint(steps, scores, tail=3, ema=1)
    assert sel.index == 5 and sel.invalid == [3, 4]


def test_all_nan_window_is_a_clear_error():
    with pytest.raises(valfree.ValfreeError, match="NaN or infinite"):
        valfree.select_checkpoint([0, 1, 2], [1.0, math.nan, math.nan], tail=2)


def test_early_stopping_waits_patience_and_survives_resume():
    rule = EarlyStopping(patience=3, min_delta=0.01, ema=1)
    series = [1.0, 0.8, 0.7, 0.695, 0.71, 0.72]
    decisions = [rule.update(i, s) for i, s in enumerate(series)]
    assert decisions == [False, False, False, False, False, True]
    assert rule.best_step == 2
    resumed = EarlyStopping()
    rule2 = EarlyStopping(patience=3, min_delta=0.01, ema=1)
    for i, s in enumerate(series[:4]):
        rule2.update(i, s)
    resumed.load_state_dict(rule2.state_dict())
    assert [resumed.update(i, s) for i, s in list(enumerate(series))[4:]] == [False, True]


def test_early_stopping_refuses_a_state_with_unknown_or_missing_keys():
    state = EarlyStopping(patience=3).state_dict()
    rule = EarlyStopping()
    with pytest.raises(valfree.ValfreeError, match="unknown keys training"):
        rule.load_state_dict({**state, "training": True})
    with pytest.raises(valfree.ValfreeError, match="missing keys wait"):
        rule.load_state_dict({k: v for k, v in state.items() if k != "wait"})
    assert not hasattr(rule, "training") and rule.patience == 5  # nothing was half restored
    rule.load_state_dict(state)
    assert rule.patience == 3


def test_early_stopping_counts_nan_as_no_improvement():
    rule = EarlyStopping(patience=2, ema=1)
    rule.update(0, 1.0)
    assert rule.update(1, math.nan) is False
    assert rule.update(2, math.nan) is True


def test_correlations_match_definitions():
    rng = np.random.default_rng(1)
    x = rng.normal(size=40)
    y = -0.8 * x + rng.normal(scale=0.5, size=40)
    c = correlations(x, y)
    assert c.pearson == pytest.approx(np.corrcoef(x, y)[0, 1], rel=1e-10)
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    assert c.spearman == pytest.approx(np.corrcoef(rx, ry)[0, 1], rel=1e-10)
    concordant = sum(np.sign(x[i] - x[j]) * np.sign(y[i] - y[j]) for i in range(40) for j in range(i))
    assert c.kendall == pytest.approx(concordant / (40 * 39 / 2), rel=1e-10)
    assert c.n == 40 and c.pearson < -0.7


def test_correlations_of_constant_series_are_nan_not_errors():
    c = correlations([1.0, 1.0, 1.0, 1.0], [0.1, 0.2, 0.3, 0.4])
    assert math.isnan(c.pearson) and c.n == 4


def test_gap_to_oracle():
    assert gap_to_oracle(1, [0.5, 0.7, 0.9]) == pytest.approx(0.2)
    assert gap_to_oracle(1, [0.5, 0.7, 0.9], higher_is_better=False) == pytest.approx(0.2)


def test_ema_step_is_the_recurrence_of_ema():
    """Online trackers (Monitor, callbacks, EarlyStopping) advance the EMA one value at a time."""
    import math

    from valfree.selection import ema, ema_step

    values = [3.0, float("nan"), 1.0, 2.0, float("inf"), 0.5]
    for span in (1, 3, 7.5):
        state, online = math.nan, []
        for v in values:
            state = ema_step(state, v, span)
            online.append(state if math.isfinite(v) else math.nan)
        assert online == pytest.approx(list(ema(values, span)), nan_ok=True)
