"""Prediction changes and label agreement against a direct element-by-element count."""

import math

import numpy as np
import pytest
import torch

from valfree.errors import ValfreeError
from valfree.probes.prediction_changes import (
    label_agreement,
    paired_difference_stderr,
    predicted_classes,
    prediction_changes,
    proportion_stderr,
)


def _direct_pc(preds):
    out = [math.nan]
    for t in range(1, len(preds)):
        changed = sum(1 for a, b in zip(preds[t], preds[t - 1]) if a != b)
        out.append(changed / len(preds[t]))
    return out


def test_pc_and_la_match_a_direct_count_on_real_models():
    torch.manual_seed(0)
    x = torch.randn(300, 5)
    y = torch.randint(0, 4, (300,))
    preds = []
    model = torch.nn.Linear(5, 4)
    for _ in range(6):  # six "checkpoints": the weights drift between them
        with torch.no_grad():
            model.weight.add_(0.3 * torch.randn_like(model.weight))
            preds.append(predicted_classes(model(x)).tolist())
    pc = prediction_changes(np.array(preds))
    assert math.isnan(pc[0])
    np.testing.assert_allclose(pc[1:], _direct_pc(preds)[1:], rtol=0, atol=0)
    la = label_agreement(np.array(preds), y.numpy())
    direct_la = [sum(int(p == int(t)) for p, t in zip(row, y)) / len(y) for row in preds]
    np.testing.assert_allclose(la, direct_la, rtol=0, atol=0)
    assert 0 < np.nanmean(pc) < 1  # the drift did change some predictions


def test_dense_and_token_outputs_count_each_location():
    logits = torch.randn(2, 3, 4, 5)  # N, C, H, W
    classes = predicted_classes(logits, channels_first=True)
    assert classes.shape == (2 * 4 * 5,)
    assert torch.equal(classes, logits.argmax(1).reshape(-1))
    tokens = torch.randn(2, 7, 11)  # N, T, vocab
    assert torch.equal(predicted_classes(tokens), tokens.argmax(-1).reshape(-1))


def test_single_logit_heads_have_no_predicted_class():
    with pytest.raises(ValfreeError, match="two classes"):
        predicted_classes(torch.randn(8, 1))


def test_ignored_elements_and_labels_are_left_out():
    preds = np.array([[0, 1, 2, -1], [0, 2, 2, 3]])
    pc = prediction_changes(preds)
    assert pc[1] == pytest.approx(1 / 3)  # the fourth element had no prediction at t=0
    la = label_agreement(preds, np.array([0, 2, -100, 3]))
    np.testing.assert_allclose(la, [1 / 3, 1.0])


def test_paired_stderr_matches_monte_carlo():
    rng = np.random.default_rng(0)
    n, g, l = 400, 0.12, 0.04
    diffs = []
    for _ in range(4000):
        u = rng.random(n)
        d = np.where(u < g, 1, np.where(u < g + l, -1, 0))
        diffs.append(d.mean())
    mc = np.std(diffs)
    se = paired_difference_stderr(g, l, n)
    # the Monte Carlo std of 4000 draws has a relative stderr of about 1/sqrt(2*4000) = 1.1 %
    assert se == pytest.approx(mc, rel=0.05)
    assert proportion_stderr(0.1, 100) == pytest.approx(0.03)
