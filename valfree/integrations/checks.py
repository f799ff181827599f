"""One check, measured once: the probe and the prediction-change columns, for every integration.

:class:`CheckMeasurer` owns the fixed data of a run (given, or drawn from the training data by
:mod:`valfree.integrations.sampling`), the head, and the :class:`PredictionTracker`. At each check it
returns the probe result and the columns ``pred_change``, ``label_agreement``, ``pred_subset``:

- the probe on the fixed probe batch (or the piggybacked training forward);
- prediction changes on the fixed subset (its first rows are the probe batch), or, when the training
  batches carried sample indices (:meth:`CheckMeasurer.observe`), the changes counted on those
  batches since the last check, with no extra forward pass.

Under DDP each rank measures its share and the counts are reduced, so every rank gets the same columns.
"""

from __future__ import annotations

import dataclasses

import torch

from ..batches import pad_token_id
from ..errors import ValfreeError
from ..probes import HeadGradient, ProbeOptions, find_head
from ..probes.batches import batch_size_of
from .distributed import rank_and_world, shard_batch
from .prediction_tracking import DEFAULT_PRED_SUBSET, PredictionTracker, training_pred_subset
from .sampling import DEFAULT_PROBE_SIZE, DEFAULT_SEED, BatchBuffer, FixedData, collate_indices, draw_indices

#: Keys of a dict batch that carry each sample's position in the training set.
INDEX_KEYS = ("index", "idx", "sample_id", "sample_ids", "indices")


def sample_ids_of(batch):
    """The sample indices a dict batch carries under one of :data:`INDEX_KEYS`, else None."""
    if isinstance(batch, dict) or (hasattr(batch, "keys") and hasattr(batch, "__getitem__")):
        for key in INDEX_KEYS:
            if key in batch:
                return batch[key]
    return None


class CheckMeasurer:
    """The probe and the prediction-change columns of one check (see the module docstring).

    ``probe_batch``: a given probe batch ``(inputs, targets)`` (its inputs are then also the
    prediction-change subset, unless ``pred_data`` is given); None to draw both from the training data.
    ``pred_subset``: how many training inputs the drawn subset holds (0: do not track predictions).
    """

    def __init__(self, probe_batch=None, *, options: ProbeOptions, pred_subset: int | None = DEFAULT_PRED_SUBSET,
                 probe_size: int = DEFAULT_PROBE_SIZE, seed: int = DEFAULT_SEED, shard: bool = True, group=None):
        self.requested = self.options = options
        self.pred_subset = DEFAULT_PRED_SUBSET if pred_subset is None else int(pred_subset)
        if self.pred_subset < 0:
            raise ValfreeError(f"pred_subset must be a count >= 0, not {pred_subset!r}.")
        self.probe_size, self.seed, self.shard, self.group = int(probe_size), int(seed), shard, group
        self.given = probe_batch
        self.data: FixedData | None = None
        self.buffer = BatchBuffer(max(self.pred_subset, self.probe_size))
        # (loader, indices) drawn but not yet collated; indices None: redraw the saved state's. Collated
        # in prepare(), where the model gives the pad token.
        self._drawn: tuple | None = None
        self._counted_while_drawn = False
        self.head = None
        self.tracker: PredictionTracker | None = None
        self._probe_shard = None
        self._pending_state: dict | None = None

    # -- the fixed data ------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        """Whether the fixed data is drawn (it is collated at :meth:`prepare`)."""
        return self.data is not None or self._drawn is not None

    def budget_subset(self, trained_per_check: int | None) -> None:
        """Size the prediction subset to the training between two checks (``training_pred_subset``:
        about 1 % of its time), unless the fixed data is already drawn; the row buffer shrinks with it
        while it is empty."""
        if self.ready:
            return
        self.pred_subset = training_pred_subset(trained_per_check)
        if not self.buffer.count:
            self.buffer = BatchBuffer(max(self.pred_subset, self.probe_size))

    def offer_loader(self, loader) -> None:
        """Draw the fixed data from a training DataLoader's dataset, when it has a map-style one."""
        if self.ready or self.given is not None:
            return
        if self._pending_state is not None:
            self._drawn = (loader, None)
            return
        indices = draw_indices(loader, max(self.pred_subset, self.probe_size), self.seed)
        if indices is not None:
            self._drawn = (loader, indices)

    def offer_batch(self, batch) -> None:
        """Keep rows of a training batch, until the fixed data is drawn."""
        if not self.ready and self.given is None and self._pending_state is None:
            self.buffer.add(batch)

    def prepare(self, model) -> None:
        """Fix the data (from what was offered), find the head, build the trackers. Idempotent."""
        if self.head is not None and self.data is not None:
            return
        self._collate_drawn(model)
        pad = pad_token_id(model)  # items of unequal length are padded with the model's pad token
        if self.data is not None:
            pass
        elif self.given is not None:
            from .monitor import split_probe_batch

            inputs, targets = split_probe_batch(self.given)
            labels = targets if isinstance(targets, torch.Tensor) and targets.dim() == 1 and not targets.is_floating_point() else None
            data = FixedData.__new__(FixedData)
            data.batch, data.source, data.indices, data.local = None, "given", None, False
            data.inputs, data.labels = inputs, labels
            data.probe_size, data.probe = batch_size_of(inputs), (inputs, targets)
            self._use(data)
        elif self._pending_state is not None:
            self._use(FixedData.from_state(self._pending_state["data"], pad_token_id=pad))
        else:
            _, world = rank_and_world(self.group)
            self._use(FixedData(self.buffer.batch(pad), self.probe_size, "batches", local=world > 1))
        self.buffer = BatchBuffer(0)
        if self.head is None:  # a piggyback probe may have found it already (and hooked it)
            inputs, targets = self.data.probe
            self.head = find_head(model, self.requested.head, inputs=inputs)
            self.options = dataclasses.replace(self.requested, head=self.head.module)

    def _collate_drawn(self, model) -> None:
        """Collate the rows drawn from the training dataset, padded with the model's pad token."""
        if self._drawn is None:
            return
        (loader, indices), self._drawn = self._drawn, None
        pad = pad_token_id(model)
        if indices is None:
            self._use(FixedData.from_state(self._pending_state["data"], loader, pad))
        else:
            self._use(FixedData(collate_indices(loader, indices, pad), self.probe_size, "dataset", indices))

    def _use(self, data: FixedData) -> None:
        self.data = data
        rank, world = rank_and_world(self.group)
        split = self.shard and not data.local
        inputs, targets = data.probe
        self._probe_shard = (shard_batch(inputs, rank, world), shard_batch(targets, rank, world)) if split else (inputs, targets)
        counted = self.tracker if self._counted_while_drawn else None
        if self.pred_subset > 0 and (self.tracker is None or counted is not None):
            # One already counting piggybacked batches stays, unless it began while drawn rows waited
            # for the model: it then gets those rows, and keeps its counts.
            pc_inputs, pc_labels = data.inputs, data.pc_labels()
            if data.source != "given" and batch_size_of(pc_inputs) > self.pred_subset:
                from ..probes.batches import take

                pc_inputs = take(pc_inputs, slice(0, self.pred_subset))
                pc_labels = None if pc_labels is None else pc_labels[: self.pred_subset]
            self.tracker = PredictionTracker(pc_inputs, pc_labels, batch_size=max(self.probe_size, 256),
                                             group=self.group, shard=split)
            if counted is not None:
                self.tracker.load_state_dict(counted.state_dict())
        self._counted_while_drawn = False
        if self._pending_state is not None and self.tracker is not None and self._pending_state.get("tracker"):
            _load_tracker(self.tracker, self._pending_state["tracker"])
        self._pending_state = None

    # -- measuring -----------------------------------------------------------------------------------
    def probe(self, model) -> HeadGradient:
        from .monitor import probe_fixed_batch

        return probe_fixed_batch(model, self.head, *self._probe_shard, self.options, self.group)

    def observe(self, sample_ids, output, labels=None) -> None:
        """Piggyback prediction changes on a training batch that carries its samples' indices."""
        if self.pred_subset > 0:
            if self.tracker is None:
                self.tracker = PredictionTracker(group=self.group)
                self._counted_while_drawn = self._drawn is not None
            self.tracker.observe(sample_ids, output, labels)

    def columns(self, model) -> dict:
        """This check's prediction-change columns ({} when predictions are not tracked)."""
        self._collate_drawn(model)
        if self.tracker is None:
            return {}
        if self.tracker.observed:
            return self.tracker.flush()
        if self.tracker.inputs is None:
            return {}
        return self.tracker.measure(model)

    # -- state ---------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        # The tracker's state as plain lists, so that checkpoints stay readable with weights_only=True
        # and the state can be written as JSON.
        tracker = None
        # Under DDP each rank holds only its share of the previous predictions, and a checkpoint keeps
        # one rank's state; so a resumed DDP run starts prediction changes afresh (its first check has
        # none) instead of comparing one rank's share with another's.
        if self.tracker is not None and rank_and_world(self.group)[1] == 1:
            t = self.tracker.state_dict()
            tracker = {"previous": None if t["previous"] is None else t["previous"].tolist(),
                       "last_seen": t["last_seen"].tolist(), "counts": t["counts"].tolist()}
        data = None if self.data is None or self.data.source == "given" else self.data.state_dict()
        if self._drawn is not None:  # drawn, not collated yet: the same description
            indices = self._drawn[1]
            data = self._pending_state["data"] if indices is None else {
                "source": "dataset", "indices": list(indices), "probe_size": min(self.probe_size, len(indices))}
        return {"data": data, "tracker": tracker}

    def load_state_dict(self, state: dict) -> None:
        """Restore the fixed data and the previous predictions; applied when the data is next needed
        (a subset of dataset indices is redrawn from the training loader)."""
        if not state:
            return
        if state.get("data") is None:
            if state.get("tracker") and self.tracker is not None:
                _load_tracker(self.tracker, state["tracker"])
            elif state.get("tracker"):
                self._pending_state = {"data": None, "tracker": state["tracker"]}
            return
        self.data = self._drawn = None
        self._pending_state = dict(state)


def _load_tracker(tracker: PredictionTracker, state: dict) -> None:
    previous = state.get("previous")
    tracker.load_state_dict({
        "previous": None if previous is None else torch.as_tensor(previous, dtype=torch.long),
        "last_seen": torch.as_tensor(state["last_seen"], dtype=torch.long),
        "counts": torch.as_tensor(state["counts"], dtype=torch.float64),
    })
