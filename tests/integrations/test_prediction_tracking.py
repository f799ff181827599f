"""Prediction changes during training: fixed subset, piggyback, and two gloo ranks."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from valfree.errors import ValfreeError
from valfree.integrations.prediction_tracking import (
    DEFAULT_PRED_SUBSET,
    MIN_TRAINING_PRED_SUBSET,
    PredictionTracker,
    training_pred_subset,
)
from valfree.probes.prediction_changes import label_agreement, prediction_changes

from .ddp_workers import run_ranks


def _snapshots(seed=0, n=300, checks=5):
    """A linear classifier whose weights drift between checks, the subset and its labels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    y[::7] = -1  # some elements carry no label
    torch.manual_seed(seed)  # the ranks build the same initial weights as this process
    model = torch.nn.Linear(6, 4)
    states = []
    for _ in range(checks):
        with torch.no_grad():
            model.weight.add_(0.4 * torch.randn(model.weight.shape, generator=g))
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return model, x, y, states


def test_fixed_subset_matches_the_direct_computation():
    model, x, y, states = _snapshots()
    tracker = PredictionTracker(x, y, batch_size=64)
    got, preds = [], []
    for state in states:
        model.load_state_dict(state)
        got.append(tracker.measure(model))
        with torch.no_grad():
            preds.append(model(x).argmax(1).numpy())
    pc, la = prediction_changes(np.array(preds)), label_agreement(np.array(preds), y.numpy())
    assert math.isnan(got[0]["pred_change"])
    np.testing.assert_allclose([r["pred_change"] for r in got[1:]], pc[1:], rtol=0, atol=1e-15)
    np.testing.assert_allclose([r["label_agreement"] for r in got], la, rtol=0, atol=1e-15)
    assert got[1]["pred_subset"] == len(x)


def test_the_model_mode_is_restored():
    model, x, y, _ = _snapshots()
    model.train()
    PredictionTracker(x, y).measure(model)
    assert model.training


def test_piggyback_compares_each_sample_with_when_it_was_last_seen():
    model, x, y, states = _snapshots(checks=4)
    tracker = PredictionTracker()
    g = torch.Generator().manual_seed(1)
    epoch_preds, got = [], []
    for state in states:  # one "epoch" per check, in a shuffled order and batches of 50
        model.load_state_dict(state)
        for idx in torch.randperm(len(x), generator=g).split(50):
            with torch.no_grad():
                tracker.observe(idx, model(x[idx]), y[idx])
        got.append(tracker.flush())
        with torch.no_grad():
            epoch_preds.append(model(x).argmax(1).numpy())
    pc = prediction_changes(np.array(epoch_preds))
    la = label_agreement(np.array(epoch_preds), y.numpy())
    assert math.isnan(got[0]["pred_change"])
    np.testing.assert_allclose([r["pred_change"] for r in got[1:]], pc[1:], atol=1e-15)
    np.testing.assert_allclose([r["label_agreement"] for r in got], la, atol=1e-15)


def test_piggyback_needs_one_index_per_prediction():
    tracker = PredictionTracker()
    with pytest.raises(ValfreeError, match="sample indices"):
        tracker.observe(torch.arange(3), torch.randn(4, 5))


def test_piggyback_takes_indices_and_labels_in_any_integer_form_and_checks_them():
    tracker = PredictionTracker()
    logits = torch.eye(3)  # classes 0, 1, 2
    tracker.observe([4, 0, 2], logits, np.array([0, -1, 2]))
    tracker.observe(torch.tensor([[2], [4], [0]]), logits.flip(0), [2, 0, 0])
    # The second batch predicts 2, 1, 0 for samples 2, 4, 0: sample 2 kept class 2, 4 moved from 0 and 0
    # from 1. Agreement: 2 of the 2 labelled in the first batch, 2 of 3 in the second.
    assert tracker.flush() == {"pred_change": 2 / 3, "label_agreement": 4 / 5, "pred_subset": 3}
    assert tracker.last_seen[:5].tolist() == [0, -1, 2, -1, 1]
    with pytest.raises(ValfreeError, match="label agreement needs one label per sample"):
        tracker.observe(torch.arange(3), logits, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValfreeError, match="non-negative"):
        tracker.observe(torch.tensor([0, -1, 2]), logits)


def test_the_training_subset_is_budgeted_against_the_training_between_checks():
    # 2 % of the inputs trained on between two checks, within [256, DEFAULT_PRED_SUBSET].
    assert training_pred_subset(100 * 128) == MIN_TRAINING_PRED_SUBSET == 256  # the Monitor's default cadence
    assert training_pred_subset(469 * 128) == 1200  # one Fashion-MNIST epoch at batch 128
    assert training_pred_subset(500 * 128) == 1280  # the HF Trainer's default save_steps
    assert training_pred_subset(10**6) == DEFAULT_PRED_SUBSET == 2048
    assert training_pred_subset(100) == training_pred_subset(None) == training_pred_subset(0) == 256


def test_state_round_trip_continues_the_series():
    model, x, y, states = _snapshots()
    a = PredictionTracker(x, y)
    model.load_state_dict(states[0])
    a.measure(model)
    b = PredictionTracker(x, y)
    b.load_state_dict(a.state_dict())
    model.load_state_dict(states[1])
    assert a.measure(model) == b.measure(model)
    with pytest.raises(ValfreeError, match="not a PredictionTracker state"):
        b.load_state_dict({"previous": None})


def tracking_worker(rank: int, world: int, out_dir: str) -> None:
    model, x, y, states = _snapshots()
    tracker = PredictionTracker(x, y, batch_size=32)
    rows = []
    for state in states:
        model.load_state_dict(state)
        rows.append(tracker.measure(model))
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(rows))


def test_ranks_share_the_subset_and_see_the_single_process_columns(tmp_path):
    run_ranks(tracking_worker, str(tmp_path))
    model, x, y, states = _snapshots()
    tracker = PredictionTracker(x, y)
    want = []
    for state in states:
        model.load_state_dict(state)
        want.append(tracker.measure(model))
    for rank in (0, 1):
        got = json.loads(Path(tmp_path, f"rank{rank}.json").read_text())
        for g_row, w_row in zip(got, want):
            for key in w_row:
                assert (math.isnan(g_row[key]) and math.isnan(w_row[key])) or g_row[key] == pytest.approx(w_row[key], abs=1e-15)
