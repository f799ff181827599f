"""Calibration data for pruning: fixed, seeded batches of inputs, and labels only when asked for.

Pruning accepts data in the forms people have at hand: a tensor of inputs, an ``(inputs, labels)``
pair of tensors, a map-style ``Dataset`` whose items are ``x``, ``(x, y, ...)`` or a dict, or any
iterable of batches (a ``DataLoader``). :func:`calibration_from` draws a fixed subset and groups it
into batches.

Labels are read only with ``labels=True``. The label-free criteria (JBR, magnitude, ...) never ask for
them, so a dataset whose labels are missing, private or broken still works: only the first element of
each item is touched.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils.data import Dataset, TensorDataset

from ..batches import batch_size_of, collate, concat, input_of, label_of, move_to, take
from ..errors import ValfreeError


@dataclass
class Calibration:
    """Batches of inputs on the pruning device, and the matching labels when they were requested."""

    inputs: list  # batches of inputs: tensors, or dicts of keyword inputs (see valfree.batches)
    batch_size: int
    label_batches: list[torch.Tensor] | None = None

    @property
    def labels(self) -> list[torch.Tensor]:
        """The label batches; only criteria that declare ``requires_labels`` get a calibration with them."""
        if self.label_batches is None:
            raise RuntimeError("this calibration set was built without labels (labels=False).")
        return self.label_batches

    @property
    def num_samples(self) -> int:
        return sum(batch_size_of(x) for x in self.inputs)

    def example_inputs(self):
        """The first calibration input, in the inputs' form (a tensor, or a dict of keyword inputs)."""
        return take(self.inputs[0], slice(0, 1))


def calibration_from(data: Any, *, batch_size: int = 64, max_samples: int | None = 1024, seed: int = 0,
                     device: torch.device | str = "cpu", labels: bool = False, what: str = "data",
                     pad_token_id: int = 0) -> Calibration:
    """Draw up to ``max_samples`` items of ``data`` (a seeded random subset) and batch them.

    ``labels=True`` also collects integer class labels and raises a :class:`ValfreeError` if the data
    has none; ``labels=False`` never reads them. Token ids of unequal length are padded with
    ``pad_token_id`` (the model's, :func:`valfree.batches.pad_token_id`).
    """
    if batch_size < 1:
        raise ValfreeError(f"batch_size must be a positive integer, not {batch_size}.")
    if max_samples is not None and max_samples < 1:
        raise ValfreeError(f"the calibration size must be a positive number of samples, not {max_samples}.")
    x, y = _gather(data, max_samples, seed, labels, what, pad_token_id)
    n = batch_size_of(x) if x is not None else 0
    if n == 0:
        raise ValfreeError(f"the {what} is empty, so there is nothing to calibrate the pruning on.")
    x = _on_device(x, device)
    inputs = [take(x, slice(i, i + batch_size)) for i in range(0, n, batch_size)]
    label_batches = None
    if labels:
        y = _check_labels(y, what)
        label_batches = list(y.to(device).split(batch_size))
    return Calibration(inputs=inputs, batch_size=batch_size, label_batches=label_batches)


def _gather(data, max_samples, seed, labels, what, pad_token_id) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(data, torch.Tensor):
        if labels:
            raise ValfreeError(f"the {what} is a tensor of inputs without labels, but this criterion needs labels; "
                               "pass (inputs, labels) or use a label-free criterion such as jbr.")
        idx = _subset(len(data), max_samples, seed)
        return data[idx], None
    if _is_inputs_labels_pair(data):
        idx = _subset(len(data[0]), max_samples, seed)
        y = None
        if labels:
            if len(data) < 2:
                raise ValfreeError(f"the {what} holds inputs only, but this criterion needs labels.")
            if len(data[1]) != len(data[0]):
                raise ValfreeError(f"the {what} has {len(data[0])} inputs but {len(data[1])} labels.")
            y = data[1][idx]
        return data[0][idx], y
    if isinstance(data, TensorDataset):
        idx = _subset(len(data), max_samples, seed)
        y = None
        if labels:
            if len(data.tensors) < 2:
                raise ValfreeError(f"the {what} holds inputs only, but this criterion needs labels.")
            y = data.tensors[1][idx]
        return data.tensors[0][idx], y
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        idx = _subset(len(data), max_samples, seed)
        items = [data[int(i)] for i in idx]
        x = collate([input_of(item) for item in items], pad_token_id)
        y = torch.stack([torch.as_tensor(_labels(item, what)) for item in items]) if labels else None
        return x, y
    if hasattr(data, "__iter__"):
        xs, ys, n = [], [], 0
        for batch in data:  # a DataLoader or any iterable of batches, in its own order
            xb = input_of(batch)
            xs.append(xb)
            if labels:
                ys.append(torch.as_tensor(_labels(batch, what)))
            n += batch_size_of(xb)
            if max_samples is not None and n >= max_samples:
                break
        if not xs:
            return None, None
        x = take(concat(xs, pad_token_id), slice(0, max_samples))
        return x, (torch.cat(ys)[:max_samples] if labels else None)
    raise ValfreeError(
        f"cannot read the {what}: a {type(data).__name__} is none of tensor, (inputs, labels), Dataset or DataLoader."
    )


def _is_inputs_labels_pair(data) -> bool:
    """``(inputs,)`` or ``(inputs, labels)`` as a tuple of tensors; a list of tensors is a list of batches."""
    if not isinstance(data, tuple) or not 1 <= len(data) <= 2 or not isinstance(data[0], torch.Tensor):
        return False
    return len(data) == 1 or isinstance(data[1], torch.Tensor)  # labels are not even measured unless needed


def _labels(item, what: str):
    label = label_of(item)
    if label is None:
        raise ValfreeError(_no_labels(what))
    return label


def _no_labels(what: str) -> str:
    return f"the {what} has no labels, but this criterion needs them; use a label-free criterion such as jbr."


def _subset(n: int, max_samples: int | None, seed: int) -> torch.Tensor:
    if max_samples is None or max_samples >= n:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[:max_samples].sort().values


def _check_labels(y: torch.Tensor | None, what: str) -> torch.Tensor:
    if y is None:
        raise ValfreeError(_no_labels(what))
    y = torch.as_tensor(y)
    if y.dim() != 1 or torch.is_floating_point(y):
        raise ValfreeError(f"the labels of the {what} must be one integer class per sample, not a {tuple(y.shape)} "
                           f"{y.dtype} tensor.")
    if (y < 0).any():
        raise ValfreeError(f"the {what} has missing labels (-1), but this criterion needs true labels; "
                           "use a label-free criterion such as jbr.")
    return y.long()


def training_batches(data: Any, *, batch_size: int, steps: int, seed: int, device: torch.device | str,
                     inputs_only: bool, pad_token_id: int = 0) -> Iterator[Any]:
    """``steps`` random batches of ``data`` for fine-tuning, on ``device``.

    With ``inputs_only`` only the inputs are yielded (labels untouched); otherwise each batch is what
    ``data`` holds per item, collated: ``(x, y)`` for an ``(inputs, labels)`` pair or a dataset of
    pairs, the loader's own batches for a DataLoader. Items are collated as :func:`calibration_from`
    collates them (token ids padded with ``pad_token_id``).
    """
    g = torch.Generator().manual_seed(seed)
    if isinstance(data, torch.Tensor) or _is_inputs_labels_pair(data) or isinstance(data, TensorDataset):
        if isinstance(data, TensorDataset):
            tensors = data.tensors
        else:
            tensors = (data,) if isinstance(data, torch.Tensor) else data
        n = len(tensors[0])
        for _ in range(steps):
            idx = torch.randint(n, (min(batch_size, n),), generator=g)
            if inputs_only or len(tensors) == 1:
                yield _float_inputs(tensors[0][idx], device)
            else:
                yield move_to(tuple(t[idx] for t in tensors), device)
        return
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        n = len(data)
        for _ in range(steps):
            items = [data[int(i)] for i in torch.randint(n, (min(batch_size, n),), generator=g)]
            if inputs_only:
                yield _on_device(collate([input_of(item) for item in items], pad_token_id), device)
            else:
                yield move_to(collate(items, pad_token_id), device)
        return
    produced = 0
    while produced < steps:  # an iterable of batches, cycled in its own order
        empty = True
        for batch in data:
            empty = False
            yield _on_device(input_of(batch), device) if inputs_only else move_to(batch, device)
            produced += 1
            if produced >= steps:
                return
        if empty:
            raise ValfreeError("the fine-tuning data yields no batch.")


def _float_inputs(x: torch.Tensor, device) -> torch.Tensor:
    return (x if torch.is_floating_point(x) else x.float()).to(device)


def _on_device(x, device):
    """A tensor of inputs as floats (images stored as integers), on ``device``; dict inputs are moved as
    they are, since their integer entries (token ids, attention masks) must stay integers."""
    return _float_inputs(torch.as_tensor(x), device) if not isinstance(x, (Mapping, tuple, list)) else move_to(x, device)
