"""The shared bookkeeping: retention never deletes a checkpoint the selection rule could still choose."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from valfree import select_checkpoint
from valfree.errors import ValfreeError
from valfree.integrations.tracking import ScoreTracker
from valfree.probes import HeadGradient
from valfree.selection import ema, tail_window


def fake_probe(value: float) -> HeadGradient:
    return HeadGradient(grad_norm=value, score_w=value, score_z=value, bias_grad_norm=0.0, loss=value, entropy=0.0,
                        confidence=1.0, margin=1.0, batch_size=8, weight_norm=1.0, feature_rms=1.0, path="direct")


def feed(tracker: ScoreTracker, values, on_each=None):
    live: set[str] = set()

    def remove(path):
        assert path in live, f"{path} removed twice or never saved"
        live.remove(path)

    for i, v in enumerate(values):
        tracker.record(10 * (i + 1), fake_probe(v), f"ckpt{i}", save=live.add, remove=remove)
        if on_each:
            on_each(i, live)
    return live


scores = st.lists(st.one_of(st.floats(0.01, 10.0), st.just(math.nan)), min_size=1, max_size=40)


@settings(max_examples=150, deadline=None)
@given(values=scores, k=st.integers(1, 4), tail=st.sampled_from([0.2, 0.5, 1.0, 3, 7]), span=st.sampled_from([1, 3]))
def test_kept_checkpoints_always_hold_the_best_and_the_top_k_of_the_window(values, k, tail, span):
    tracker = ScoreTracker(tail=tail, ema=span, save_top_k=k)

    def check(i, live):
        n = i + 1
        smoothed = ema(values[:n], span)
        np.testing.assert_allclose(tracker.smoothed, smoothed, equal_nan=True)
        start, _ = tail_window(n, tail)
        window = [j for j in range(start, n) if math.isfinite(smoothed[j])]
        top = sorted(window, key=lambda j: (smoothed[j], j))[:k]
        assert {f"ckpt{j}" for j in top} <= live
        best = tracker.best()
        if window:
            want = select_checkpoint(tracker.steps, values[:n], tail=tail, ema=span)
            assert best.step == 10 * (want.index + 1)
            assert best.path in live
        assert set(tracker.kept_paths) == live

    feed(tracker, values, check)


def test_a_steadily_improving_score_keeps_exactly_the_latest_k():
    tracker = ScoreTracker(tail=1.0, save_top_k=3)
    live = feed(tracker, [10 - i for i in range(12)])
    assert live == {"ckpt9", "ckpt10", "ckpt11"}


def test_keep_all_and_save_none():
    assert feed(ScoreTracker(save_top_k=-1), [3, 2, 4, 1]) == {"ckpt0", "ckpt1", "ckpt2", "ckpt3"}
    assert feed(ScoreTracker(save_top_k=0), [3, 2, 4, 1]) == set()


def test_a_non_finite_score_is_never_saved():
    assert feed(ScoreTracker(save_top_k=5, tail=1.0), [1.0, math.nan, 2.0]) == {"ckpt0", "ckpt2"}


def test_state_round_trip_continues_identically():
    values = [5, 3, 4, 2, 6, 1, 7, 8, 0.5, 9]
    whole = ScoreTracker(save_top_k=2, tail=0.5, patience=2)
    feed(whole, values)
    first = ScoreTracker(save_top_k=2, tail=0.5, patience=2)
    feed(first, values[:5])
    second = ScoreTracker(save_top_k=2, tail=0.5, patience=2)
    second.load_state_dict(first.state_dict())
    live = set(second.kept_paths)
    for i, v in enumerate(values[5:], start=5):
        second.record(10 * (i + 1), fake_probe(v), f"ckpt{i}", save=live.add, remove=live.remove)
    assert second.state_dict() == whole.state_dict()
    assert live == set(whole.kept_paths)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"score": "accuracy"}, "is not a probe field"),
        ({"mode": "lowest"}, "mode must be"),
        ({"tail": 1.5}, "tail fraction"),
        ({"save_top_k": -2}, "save_top_k must be"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ValfreeError, match=message):
        ScoreTracker(**kwargs)


def test_steps_must_increase():
    tracker = ScoreTracker()
    tracker.record(10, fake_probe(1.0))
    with pytest.raises(ValfreeError, match="does not come after"):
        tracker.record(10, fake_probe(1.0))
