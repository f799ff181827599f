"""The online rule tracker agrees with the offline rule and stops only after its warm-up."""

import math

import numpy as np
import pytest

from valfree.errors import ValfreeError
from valfree.selection.online import RuleTracker
from valfree.selection.rules import select_by_rule

from .test_rules import _clean_run, _noisy_run


def _feed(tracker, steps, cols):
    stopped_at = None
    for i, s in enumerate(steps):
        if tracker.update(s, **{k: v[i] for k, v in cols.items()}) and stopped_at is None:
            stopped_at = i
    return stopped_at


@pytest.mark.parametrize("rule", ["probe", "label-wave", "guarded", "guarded-wave"])
def test_online_choice_equals_offline_choice(rule):
    steps, cols = _noisy_run()
    tracker = RuleTracker(rule, warmup=2)
    _feed(tracker, steps, cols)
    assert tracker.choice.step == select_by_rule(rule, steps, cols).step


def test_guarded_stops_once_memorisation_is_confirmed_and_keeps_the_wave_point():
    steps, cols = _noisy_run()
    tracker = RuleTracker("guarded", warmup=2)
    stopped_at = _feed(tracker, steps, cols)
    assert stopped_at is not None and stopped_at < len(steps) - 1
    prefix = {k: v[: stopped_at + 1] for k, v in cols.items()}
    choice = select_by_rule("guarded", steps[: stopped_at + 1], prefix)
    assert choice.guard_fired and tracker.choice.step == choice.step == choice.wave_step
    assert choice.step in tracker.candidate_steps()


def test_clean_run_trains_to_the_end():
    steps, cols = _clean_run()
    for rule in ("guarded", "label-wave"):
        assert _feed(RuleTracker(rule, warmup=2), steps, cols) is None


def test_no_stop_during_warmup():
    # a probe that rises from the start would stop a patience-3 rule at check 3 without a warm-up
    steps = np.arange(1, 21) * 10.0
    rising = {"grad_norm": np.linspace(1, 3, 20)}
    assert _feed(RuleTracker("probe", warmup=0, patience=3), steps, rising) == 3
    # the warm-up holds the first 10 checks; the patience then counts from the first check after it
    # (index 10), whose score becomes the best, so the rule stops 3 checks later
    assert _feed(RuleTracker("probe", warmup=0.5, patience=3, expected_checks=20), steps, rising) == 13


def test_a_minimum_inside_the_warmup_does_not_end_the_patience_at_once():
    # the probe is lowest at the very first check, then flat: without restarting the patience at the
    # end of the warm-up, the patience would already have run out at check 10
    steps = np.arange(1, 31) * 10.0
    early_low = {"grad_norm": np.array([0.1] + [1.0] * 29)}
    assert _feed(RuleTracker("probe", warmup=10, patience=5), steps, early_low) == 15


def test_state_round_trip_and_validation():
    steps, cols = _noisy_run()
    a = RuleTracker("guarded", warmup=2)
    _feed(a, steps[:8], {k: v[:8] for k, v in cols.items()})
    b = RuleTracker("guarded")
    b.load_state_dict(a.state_dict())
    rest = {k: v[8:] for k, v in cols.items()}
    assert _feed(a, steps[8:], rest) == _feed(b, steps[8:], rest)
    assert a.choice.step == b.choice.step
    with pytest.raises(ValfreeError, match="unexpected bogus"):
        b.load_state_dict({**a.state_dict(), "bogus": 1})
    state = a.state_dict()
    del state["series"]
    with pytest.raises(ValfreeError, match="missing series"):
        b.load_state_dict(state)


def test_steps_must_increase():
    t = RuleTracker("probe")
    t.update(10, grad_norm=1.0)
    with pytest.raises(ValfreeError, match="increasing step order"):
        t.update(5, grad_norm=1.0)
