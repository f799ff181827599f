"""Prediction changes in ``valfree score``: the fixed training subset, each checkpoint's classes on
it, and the ``pred_change`` column, recomputed from the sidecar in step order.

The subset is a seeded draw of ``pred_subset`` training items that contains the probe batch (the same
seeded permutation, cut longer), so the probe's forward pass is also the first chunk of the subset's:
the probe costs nothing extra. Its size: PC near its minimum is a few per cent, and its standard error
sqrt(p (1 - p) / n) at p = 0.03 is 0.0038 with n = 2048 (0.0027 with 4096); the Label Wave minimum
and the guard's agreement gain need differences of that order to be resolved.

``label_agreement`` depends on one checkpoint alone and is written with its row. ``pred_change``
compares a checkpoint with its predecessor in step order, so it is recomputed for every row after
each run from the classes in the sidecar (:mod:`valfree.io.predictions`): checkpoints added later,
scored out of order or by other torchrun ranks all end up with the column a single in-order run
writes.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np
import torch
from torch import nn

from ..errors import NonFiniteScore
from ..io.data import seeded_indices
from ..io.predictions import PredictionSidecar, indices_hash
from ..io.results import STATUS_OK, ResultsStore
from ..batches import batch_size_of, move_to, take
from ..probes.forward import capture_forward, parameter_dtype
from ..probes.head_gradient import HeadGradient, probe_features
from ..probes.heads import Head, find_head
from ..probes.options import ProbeOptions
from ..probes.prediction_changes import label_agreement, predicted_classes, prediction_changes
from ..selection.rules import DEFAULT_PRED_SUBSET  # noqa: F401  (the size, chosen as the docstring says)
from .preflight import draw_probe_batch

PC_COLUMNS = ("pred_change", "label_agreement", "pred_subset")


def digest(batch) -> str:
    """A short hash of a batch's tensors (recorded with the results, so other data is never mixed in)."""
    h = hashlib.sha256()
    items = sorted(batch.items()) if isinstance(batch, dict) else [("", batch)]
    for name, value in items:
        h.update(name.encode())
        if isinstance(value, torch.Tensor):
            h.update(str(value.dtype).encode())
            h.update(str(tuple(value.shape)).encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class TrainingSubset:
    """The probe batch, then the rest of the prediction subset, drawn from one seeded permutation."""

    def __init__(self, dataset, batch_size: int, size: int, seed: int, data_spec: str, split: str):
        probe_idx = seeded_indices(dataset, batch_size, seed)
        all_idx = seeded_indices(dataset, max(size, batch_size), seed)
        x_all, y_all = draw_probe_batch(dataset, data_spec, max(size, batch_size), seed)
        # seeded_indices cuts one permutation, so the probe's items are among the subset's; find where.
        at = torch.searchsorted(all_idx, probe_idx)
        rest = torch.ones(len(all_idx), dtype=torch.bool)
        rest[at] = False
        self.x_probe, self.y_probe = take(x_all, at), y_all[at]
        self.x_rest = take(x_all, torch.nonzero(rest).flatten()) if bool(rest.any()) else None
        self.labels = torch.cat([self.y_probe, y_all[rest]]).reshape(-1)
        order = torch.cat([probe_idx, all_idx[rest]])
        self.size = len(order)
        self.meta = {"data": data_spec, "split": split, "seed": seed, "size": self.size,
                     "index_hash": indices_hash(order.numpy())}

    def label_array(self) -> np.ndarray:
        return self.labels.numpy().astype(np.int64)


def probe_and_classes(net: nn.Module, head: str | nn.Module | None, subset: TrainingSubset, target, options: ProbeOptions,
                      device: str, chunk: int) -> tuple[HeadGradient, np.ndarray]:
    """The probe of the probe batch and the predicted classes of the whole subset (probe batch first),
    from one forward pass over each chunk; the head's output is the prediction."""
    dtype = parameter_dtype(net)
    inputs = move_to(subset.x_probe, device, dtype)
    found: Head = find_head(net, head, inputs)
    (cap,) = capture_forward(net, inputs, [found])
    probe = probe_features(cap.features, cap.logits, target, found.weight, found.bias, options)
    classes = [predicted_classes(cap.logits).cpu()]
    if subset.x_rest is not None:
        n = batch_size_of(subset.x_rest)
        for start in range(0, n, chunk):
            part = move_to(take(subset.x_rest, slice(start, start + chunk)), device, dtype)
            (cap,) = capture_forward(net, part, [found])
            classes.append(predicted_classes(cap.logits).cpu())
    out = torch.cat(classes).numpy()
    if out.shape[0] != subset.size:
        # Dense or token outputs give one class per location, which this subset's labels do not cover.
        raise ValueError(f"the head gives {out.shape[0]} predictions for {subset.size} subset items; "
                         "prediction changes apply to one class per input")
    return probe, out


def check_finite(probe: HeadGradient) -> None:
    bad = [name for name in ("grad_norm", "score_w", "score_z", "loss") if not math.isfinite(float(getattr(probe, name)))]
    if bad:
        raise NonFiniteScore(f"the probe of this checkpoint is not finite ({', '.join(f'{b}={getattr(probe, b)}' for b in bad)}).")


def agreement_columns(classes: np.ndarray, labels: np.ndarray) -> dict:
    la = label_agreement(classes[None, :], labels)[0]
    return {"label_agreement": la, "pred_subset": int(classes.shape[0])}


def refresh_prediction_changes(out) -> int:
    """Recompute ``pred_change`` for every row of the results ``out`` from the sidecar, in step order;
    rows without recorded classes are passed over. Returns how many rows have a value."""
    sidecar = PredictionSidecar(out)
    if sidecar.meta() is None:
        return 0
    store = ResultsStore(out)
    rows = [r for r in store.rows() if r.get("status", STATUS_OK) == STATUS_OK]
    rows.sort(key=lambda r: (_as_float(r.get("step")), str(r.get("path", ""))))
    updates, previous, count = {}, None, 0
    for row in rows:
        key = ResultsStore.key(row)
        classes = sidecar.get(key)
        if classes is None:
            continue
        value = math.nan if previous is None else float(prediction_changes(np.stack([previous, classes]))[1])
        updates[key] = {"pred_change": value}
        count += not math.isnan(value)
        previous = classes
    store.update_columns(updates)
    return count


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.inf
