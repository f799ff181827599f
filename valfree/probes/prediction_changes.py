"""Prediction changes (PC) and label agreement (LA) on a fixed subset of training inputs.

Label Wave (Yuan, Feng and Liu, ICLR 2025) tracks how many training examples change their predicted
class between consecutive checkpoints. For checkpoints t-1, t in step order and a fixed subset S,

    PC_t = (1/|S|) sum_{x in S} [argmax f_t(x) != argmax f_{t-1}(x)],      PC_0 undefined (NaN),

which reads no label. Label agreement with the labels the model was trained on,

    LA_t = (1/|S|) sum_{x in S} [argmax f_t(x) == y_given(x)],

reads the training labels, as the probe does.

Both are means of Bernoulli indicators over the same |S| examples, so their standard errors are
sqrt(p (1 - p) / |S|) (:func:`proportion_stderr`). The difference of two label agreements measured on
the *same* subset is a paired difference of indicators d_x = a_x - b_x in {-1, 0, 1}; its standard
error is sqrt((g + l - (g - l)^2) / |S|), with g and l the fractions that moved into and out of
agreement (:func:`paired_difference_stderr`).

Dense and token outputs: every location (pixel, token) whose label is not ignored is one element of
S, and a change is counted per location. Multi-label (sigmoid) heads have no single predicted class:
:func:`predicted_classes` refuses them, and the rules that use PC do not apply to them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import ValfreeError


def predicted_classes(logits: torch.Tensor, channels_first: bool = False) -> torch.Tensor:
    """The argmax class of each element, flattened to 1-D (int64).

    ``logits`` is (N, C) for classifiers, (N, C, ...) with ``channels_first`` for dense heads, or
    (N, ..., C) otherwise (token outputs). Each location is one element of the subset.
    """
    if logits.ndim < 2:
        raise ValfreeError(f"prediction changes need logits with a class dimension, got shape {tuple(logits.shape)}.")
    dim = 1 if channels_first else -1
    if logits.shape[dim] < 2:
        raise ValfreeError(
            "prediction changes need at least two classes; a single-logit (binary sigmoid or regression) "
            "head has no predicted class to change."
        )
    return logits.detach().argmax(dim=dim).reshape(-1)


def _as_matrix(predictions) -> np.ndarray:
    pred = np.asarray(predictions)
    if pred.ndim != 2:
        raise ValfreeError(f"predictions must be a (checkpoints, subset) array of classes, got shape {pred.shape}.")
    return pred


def prediction_changes(predictions) -> np.ndarray:
    """PC_t for each row t of a (T, |S|) array of predicted classes in step order; PC_0 is NaN.

    Entries below 0 mark elements to ignore (no prediction recorded): a pair counts only where both
    checkpoints have a prediction, and a checkpoint with no element in common with its predecessor
    gets NaN.
    """
    pred = _as_matrix(predictions)
    out = np.full(len(pred), np.nan)
    for t in range(1, len(pred)):
        both = (pred[t] >= 0) & (pred[t - 1] >= 0)
        if both.any():
            out[t] = float(np.mean(pred[t][both] != pred[t - 1][both]))
    return out


def label_agreement(predictions, labels) -> np.ndarray:
    """LA_t = fraction of the subset whose predicted class equals the given label, for each row t.

    Labels below 0 (an ignore index, or no label) are left out of the mean; with no label at all the
    result is NaN.
    """
    pred = _as_matrix(predictions)
    y = np.asarray(labels).reshape(-1)
    if y.shape[0] != pred.shape[1]:
        raise ValfreeError(f"{y.shape[0]} labels for a subset of {pred.shape[1]} predictions.")
    keep = y >= 0
    if not keep.any():
        return np.full(len(pred), np.nan)
    return np.array([float(np.mean(row[keep] == y[keep])) for row in pred])


def proportion_stderr(p: float, n: int) -> float:
    """Standard error sqrt(p (1 - p) / n) of a mean of n Bernoulli indicators (NaN if undefined)."""
    if n <= 0 or not math.isfinite(p):
        return math.nan
    return math.sqrt(max(p * (1.0 - p), 0.0) / n)


def paired_difference_stderr(gain: float, loss: float, n: int) -> float:
    """Standard error of a difference of two proportions measured on the same n elements.

    With d_x = a_x - b_x in {-1, 0, 1}, P(d = 1) = ``gain`` and P(d = -1) = ``loss``,
    Var(d) = gain + loss - (gain - loss)^2, and the mean of n such d has variance Var(d) / n.
    """
    if n <= 0:
        return math.nan
    return math.sqrt(max(gain + loss - (gain - loss) ** 2, 0.0) / n)
