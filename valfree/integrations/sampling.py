"""Where the callbacks' fixed data comes from when the user passes none: the probe batch and the
prediction-change subset, drawn once from the training data and kept for the whole run.

Two sources, tried in this order:

- **the training dataset** (:func:`draw_indices`, :func:`collate_indices`): a map-style dataset (one
  with ``len`` and indexing) behind the training DataLoader. A seeded draw of indices, collated with
  the loader's own ``collate_fn`` (so a Hugging Face data collator pads as in training), or else
  padded with the model's pad token. This is the draw ``valfree score`` makes on a data spec, and only
  the indices need saving to draw it again on resume.
- **the first training batches** (:class:`BatchBuffer`): for iterable datasets, a plain loop, or when
  no loader is at hand. Rows are taken in the order they arrive (a shuffling loader makes them a
  random draw) until the subset is full or the first check comes. The rows themselves are saved.

The subset's first ``probe_size`` rows are the probe batch, so the probe's images are also in the
prediction-change subset. Labels are read where the batch has them (:func:`valfree.probes.batches.label_of`);
without labels the probe uses the model's own argmax ("pseudo") and label agreement is not measured.
"""

from __future__ import annotations

import torch

from ..errors import ValfreeError
from ..probes.batches import batch_size_of, collate, concat, input_of, label_of, take

DEFAULT_PROBE_SIZE = 256
DEFAULT_SEED = 0


def draw_indices(loader, size: int, seed: int = DEFAULT_SEED) -> list[int] | None:
    """A seeded draw of ``size`` indices of ``loader.dataset``; None when the loader has no map-style
    dataset to index. The items are read and collated later, by :func:`collate_indices`, once the
    model (and so its pad token) is known."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or isinstance(dataset, torch.utils.data.IterableDataset):
        return None
    try:
        n = len(dataset)
    except TypeError:
        return None
    if n == 0:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(size, n)].sort().values.tolist()


def collate_indices(loader, indices, pad_token_id: int = 0):
    """The items ``indices`` of ``loader.dataset`` collated as the loader does: by its ``collate_fn``
    (a Hugging Face data collator pads with its tokenizer's pad token), else by
    :func:`valfree.batches.collate`, which pads ``input_ids`` with ``pad_token_id`` (the model's)."""
    items = [loader.dataset[i] for i in indices]
    collate_fn = getattr(loader, "collate_fn", None)
    if collate_fn is not None:
        try:
            return collate_fn(items)
        except Exception:  # noqa: BLE001 - a collator with side conditions; the generic one pads the same way
            pass
    return collate(items, pad_token_id)


class BatchBuffer:
    """Collects rows from the first training batches until ``size`` rows are held."""

    def __init__(self, size: int):
        self.size = int(size)
        self.parts: list = []
        self.count = 0

    @property
    def full(self) -> bool:
        return self.count >= self.size

    def add(self, batch) -> None:
        if self.full or batch is None:
            return
        n = batch_size_of(input_of(batch))
        keep = min(n, self.size - self.count)
        self.parts.append(_detach_cpu(take(batch, slice(0, keep))))
        self.count += keep

    def batch(self, pad_token_id: int = 0):
        """The rows held, as one batch; token ids of unequal length are padded with ``pad_token_id``."""
        if not self.parts:
            return None
        return self.parts[0] if len(self.parts) == 1 else concat(self.parts, pad_token_id)


class FixedData:
    """The run's fixed data: the prediction-change subset and, as its first rows, the probe batch.

    ``source`` is ``"dataset"`` (``indices`` of the training dataset) or ``"batches"`` (rows taken
    from the first training batches, kept in the state). ``local``: each rank drew its own rows (from
    its own batches), so they are not to be sharded again.
    """

    def __init__(self, batch, probe_size: int, source: str, indices=None, local: bool = False):
        if batch is None:
            raise ValfreeError("no training data was seen to draw the probe batch from.")
        self.batch, self.source, self.indices, self.local = batch, source, indices, local
        self.inputs = input_of(batch)
        labels = label_of(batch)
        self.labels = None if labels is None or isinstance(labels, str) else torch.as_tensor(labels)
        n = batch_size_of(self.inputs)
        self.probe_size = min(int(probe_size), n)
        probe_inputs = take(self.inputs, slice(0, self.probe_size))
        probe_targets = "pseudo" if self.labels is None else self.labels[: self.probe_size]
        self.probe = (probe_inputs, probe_targets)

    @property
    def size(self) -> int:
        return batch_size_of(self.inputs)

    def pc_labels(self):
        """Labels for label agreement: one class per sample, -1 where there is none (token labels are
        not one per sample, so agreement is not measured on them)."""
        if self.labels is None or self.labels.dim() != 1 or self.labels.is_floating_point():
            return None
        return self.labels

    def state_dict(self) -> dict:
        if self.source == "dataset":
            return {"source": "dataset", "indices": list(self.indices), "probe_size": self.probe_size}
        return {"source": "batches", "batch": self.batch, "probe_size": self.probe_size, "local": self.local}

    @classmethod
    def from_state(cls, state: dict, loader=None, pad_token_id: int = 0) -> "FixedData":
        """The fixed data a :meth:`state_dict` describes; dataset indices are redrawn from ``loader``
        and collated as :func:`collate_indices` does."""
        if state.get("source") == "dataset":
            dataset = getattr(loader, "dataset", None)
            if dataset is None:
                raise ValfreeError("the saved probe subset is a list of training-set indices, but no training dataset is at hand to redraw it.")
            indices = [int(i) for i in state["indices"]]
            if indices and max(indices) >= len(dataset):
                raise ValfreeError("the saved probe subset indexes past the end of the training set; resume with the same data.")
            return cls(collate_indices(loader, indices, pad_token_id), state["probe_size"], "dataset", indices)
        if state.get("source") == "batches":
            return cls(state["batch"], state["probe_size"], "batches", local=bool(state.get("local", False)))
        raise ValfreeError(f"not a saved probe subset (source {state.get('source')!r}).")


def _detach_cpu(batch):
    if isinstance(batch, torch.Tensor):
        return batch.detach().cpu()
    if isinstance(batch, dict) or hasattr(batch, "keys"):
        return {k: _detach_cpu(v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_detach_cpu(v) for v in batch) if isinstance(batch, tuple) else [_detach_cpu(v) for v in batch]
    return batch
