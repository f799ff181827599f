"""Prediction changes during training: on a fixed training subset, or piggybacked on the training
forward when batches carry sample indices.

Two ways to measure PC_t and LA_t (see :mod:`valfree.probes.prediction_changes`):

- **fixed subset** (:meth:`PredictionTracker.measure`): at each check the model predicts the same
  seeded subset of training inputs in eval mode, and each element is compared with its prediction at
  the previous check. This is what ``valfree score`` measures on a folder, so the two agree.
- **piggyback** (:meth:`PredictionTracker.observe`, then :meth:`PredictionTracker.flush` at a check):
  no extra forward. Each training batch's predictions are compared with the same samples'
  predictions when they were last seen, which is Label Wave's own protocol (the official code records
  predictions in the training forward and compares epochs). It needs the sample indices of the batch.

Under torch.distributed every rank measures its own share (the subset's elements ``rank::world``, or
its own micro-batches) and the four counts (changed, compared, agreeing, labelled) are summed across
ranks, so every rank sees the same PC and LA and decides alike.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import ValfreeError
from ..batches import move_to
from ..probes.forward import call_model
from ..probes.prediction_changes import predicted_classes
from ..selection.rules import DEFAULT_PRED_SUBSET  # `valfree score`'s size, the cap during training
from .distributed import collective_device, is_distributed, rank_and_world, shard_batch

#: During training, the share of the training time since the last check that the default subset's
#: prediction pass may take.
TRAINING_BUDGET = 0.01
#: Inputs predicted in eval mode for the time of training on one input (forward, backward, update):
#: 2.4 for the demo CNN and 3.2 for the MLP on 2048 inputs, 2.3 and 2.7 on 256, one CPU thread
#: (benchmarks/results/integration_overhead.json, "prediction_changes"; a backward costs about two
#: forwards). 2 leaves room for models and machines where it is lower.
PREDICTED_PER_TRAINED = 2.0
#: The smallest default subset: the probe batch's size, so that at a frequent cadence the prediction
#: pass costs no more than the probe's own forward. (PC's standard error at p = 0.1 is 0.019 on 256
#: inputs, against 0.0066 on 2048.)
MIN_TRAINING_PRED_SUBSET = 256


def training_pred_subset(trained_per_check: int | None) -> int:
    """The default prediction-change subset during training, for checks that come every
    ``trained_per_check`` training inputs (summed over ranks; None when unknown).

    A fixed subset costs one eval-mode forward over it at every check, so its size is budgeted against
    the training between two checks: the most inputs whose prediction pass takes ``TRAINING_BUDGET``
    (1 %) of it, i.e. 2 % of the inputs trained on, between ``MIN_TRAINING_PRED_SUBSET`` and
    ``DEFAULT_PRED_SUBSET`` (`valfree score`'s size, reached from 102400 inputs per check). Measured
    on the demo CNN (benchmarks/results/integration_overhead.json, "prediction_changes"): the full
    2048 cost 6.7 % of the training at the Monitor's default cadence (every 100 steps of 128) and
    1.4 % at one check per 469-step Fashion-MNIST epoch; the budgeted 256 and 1200 cost 0.86 % and
    0.85 %. Unknown: the minimum.
    """
    if not trained_per_check or trained_per_check <= 0:
        return MIN_TRAINING_PRED_SUBSET
    budgeted = int(TRAINING_BUDGET * PREDICTED_PER_TRAINED * trained_per_check)
    return max(MIN_TRAINING_PRED_SUBSET, min(DEFAULT_PRED_SUBSET, budgeted))


def _logits_of(output):
    """The logits tensor of a model output: a tensor, a dict/ModelOutput's ``logits``, or a tuple's first."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, dict) or hasattr(output, "keys"):
        if "logits" in output:
            return output["logits"]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ValfreeError("prediction changes need a model that returns logits (a tensor, or a dict or tuple holding them).")


class PredictionTracker:
    """Counts prediction changes and label agreement between checks (see the module docstring).

    ``inputs``/``labels`` are the fixed subset for :meth:`measure` (labels -1 or None where there are
    none); leave them out for piggyback-only use. ``batch_size`` bounds the forward chunks.
    """

    def __init__(self, inputs=None, labels: torch.Tensor | None = None, batch_size: int = 256, group=None,
                 shard: bool = True):
        self.group = group
        self.batch_size = int(batch_size)
        rank, world = rank_and_world(group)
        shard = shard and world > 1  # shard=False: each rank already holds its own share
        self.inputs = shard_batch(inputs, rank, world) if inputs is not None and shard else inputs
        if labels is not None and shard:
            labels = shard_batch(labels, rank, world)
        self.labels = None if labels is None else torch.as_tensor(labels).reshape(-1).long().cpu()
        self.previous: torch.Tensor | None = None  # the subset's classes at the last check (this rank's share)
        # piggyback: each sample's class when it was last seen, -1 before that
        self.last_seen = torch.full((0,), -1, dtype=torch.long)
        self._counts = torch.zeros(4, dtype=torch.float64)

    # -- fixed subset ----------------------------------------------------------------------------
    @torch.no_grad()
    def classes(self, model: nn.Module) -> torch.Tensor:
        """This rank's share of the subset, predicted in eval mode (the model's mode is restored)."""
        if self.inputs is None:
            raise ValfreeError("this PredictionTracker has no fixed subset; pass inputs=... or use observe() with sample indices.")
        param = next((p for p in model.parameters()), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else None
        was = model.training
        model.eval()
        try:
            out = []
            n = _length(self.inputs)
            for i in range(0, n, self.batch_size):
                chunk = move_to(_slice(self.inputs, i, i + self.batch_size), device, dtype)
                out.append(predicted_classes(_logits_of(call_model(model, chunk))).cpu())
        finally:
            model.train(was)
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def measure(self, model: nn.Module) -> dict:
        """Predict the subset, compare with the previous check, and return the columns
        ``pred_change`` (NaN at the first check), ``label_agreement`` and ``pred_subset``."""
        now = self.classes(model)
        counts = torch.zeros(4, dtype=torch.float64)
        if self.previous is not None and len(self.previous) == len(now):
            counts[0] = float((now != self.previous).sum())
            counts[1] = float(len(now))
        if self.labels is not None:
            keep = self.labels >= 0
            counts[2] = float((now[keep] == self.labels[keep]).sum())
            counts[3] = float(keep.sum())
        self.previous = now
        return self._columns(counts)

    # -- piggyback -------------------------------------------------------------------------------
    def observe(self, sample_ids: torch.Tensor, output, labels: torch.Tensor | None = None) -> None:
        """Count one training batch: ``sample_ids`` are the dataset indices of its samples, ``output``
        the model's output (or logits) from the training forward, ``labels`` the given labels.

        After the argmax the counting is done in numpy on the host: right after a backward every torch
        call pays a cold dispatch, and the dozen torch calls this took cost about 0.3 ms a step,
        against 0.2 ms in numpy, side by side on the MLP of benchmarks/integration_overhead.py."""
        now = _host(predicted_classes(_logits_of(output)))
        ids = _host(sample_ids)
        if len(ids) != len(now):
            raise ValfreeError(
                f"{len(ids)} sample indices for {len(now)} predictions; piggybacked prediction changes need one index "
                "per sample (dense and token outputs are not supported here)."
            )
        if len(ids) and ids.min() < 0:
            raise ValfreeError("sample indices must be non-negative dataset positions.")
        top = int(ids.max()) + 1 if len(ids) else 0
        if top > len(self.last_seen):
            grown = torch.full((max(top, 2 * len(self.last_seen)),), -1, dtype=torch.long)
            grown[: len(self.last_seen)] = self.last_seen
            self.last_seen = grown
        last = self.last_seen.numpy()  # a view: writing it writes last_seen
        before = last[ids]
        seen = before >= 0
        counts = [np.count_nonzero((now != before) & seen), np.count_nonzero(seen), 0, 0]
        if labels is not None:
            y = _host(labels)
            if len(y) != len(now):
                raise ValfreeError(f"{len(y)} labels for {len(now)} predictions; label agreement needs one label per sample.")
            keep = y >= 0
            counts[2:] = np.count_nonzero((now == y) & keep), np.count_nonzero(keep)
        self._counts.numpy()[:] += counts
        last[ids] = now

    @property
    def observed(self) -> bool:
        """Whether piggybacked batches were counted since the last flush."""
        return bool(self._counts[1] > 0 or self._counts[3] > 0)

    def flush(self) -> dict:
        """The columns over the batches observed since the last flush, then start counting afresh."""
        counts, self._counts = self._counts, torch.zeros(4, dtype=torch.float64)
        return self._columns(counts)

    # -- shared ----------------------------------------------------------------------------------
    def _columns(self, counts: torch.Tensor) -> dict:
        if is_distributed(self.group):
            import torch.distributed as dist

            device = collective_device("cpu", self.group)
            counts = counts.to(device)
            dist.all_reduce(counts, group=self.group)
            counts = counts.cpu()
        changed, compared, agree, labelled = (float(c) for c in counts)
        return {
            "pred_change": changed / compared if compared else math.nan,
            "label_agreement": agree / labelled if labelled else math.nan,
            "pred_subset": int(compared) if compared else int(labelled),
        }

    def state_dict(self) -> dict:
        return {"previous": self.previous, "last_seen": self.last_seen.clone(), "counts": self._counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"previous", "last_seen", "counts"}:
            raise ValfreeError(f"not a PredictionTracker state (keys {sorted(state)}).")
        self.previous = state["previous"]
        self.last_seen = torch.as_tensor(state["last_seen"]).long().cpu().contiguous()
        self._counts = torch.as_tensor(state["counts"], dtype=torch.float64)


def _host(values) -> np.ndarray:
    """A tensor, array or sequence of integers as a flat int64 numpy array on the host."""
    if isinstance(values, torch.Tensor):
        # Each torch call costs microseconds here, so a host tensor outside autograd is viewed directly.
        on_host = values.device.type == "cpu" and not values.requires_grad
        values = values.numpy() if on_host else values.detach().cpu().numpy()
    return np.asarray(values).reshape(-1).astype(np.int64, copy=False)


def _length(inputs) -> int:
    if isinstance(inputs, dict):
        return len(next(iter(inputs.values())))
    if isinstance(inputs, (tuple, list)):
        return len(inputs[0])
    return len(inputs)


def _slice(inputs, start: int, stop: int):
    if isinstance(inputs, dict):
        return {k: v[start:stop] for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)):
        return type(inputs)(v[start:stop] for v in inputs)
    return inputs[start:stop]
