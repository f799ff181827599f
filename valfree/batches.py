"""Where a data item or batch keeps its inputs and its labels, collating items, and calling the model.

Every layer that reads user data (the probe batch, TPV, pruning calibration, the training callbacks)
accepts the same forms:

- a tensor of inputs;
- a tuple or list ``(inputs, labels, ...)``;
- a dict (any mapping, e.g. a Hugging Face ``BatchEncoding``). Its labels are the entry under one of
  :data:`LABEL_KEYS`. Its inputs are everything else, passed to the model as keyword arguments, the
  way the Hugging Face Trainer does (``input_ids``, ``attention_mask``, ``pixel_values``...); a dict
  whose only input sits under one of :data:`INPUT_KEYS` (``{"x": ..., "y": ...}``, ``{"image": ...,
  "label": ...}``) gives that tensor itself, as a positional input. Text columns (strings) are never
  model inputs and are left out.

:func:`collate` turns a list of items into one batch of the same form (padding token sequences of
unequal length) and :func:`concat` joins batches; :func:`forward` calls a model on inputs of any form
and :func:`logits_of` reads the logits from what it returns; :func:`take`, :func:`batch_size_of` and
:func:`move_to` index, measure and move a batch of any form.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .errors import ValfreeError

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
LABEL_KEYS = ("y", "label", "labels", "label_ids", "target", "targets")
#: Padding value per key when :func:`collate` pads sequences; ``input_ids`` uses the model's pad token.
PAD_VALUES = {"labels": -100, "label": -100, "label_ids": -100, "y": -100, "target": -100, "targets": -100}


def _is_text(value) -> bool:
    """Strings, and lists of them (a collated text column), which no tensor model takes."""
    if isinstance(value, (str, bytes)):
        return True
    return isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, (str, bytes)) for v in value)


def input_of(item):
    """The inputs of a data item or batch, touching nothing else in it (labels may be missing or broken).

    A dict gives a dict of keyword inputs (every entry but the labels and text columns), or the tensor
    itself when its only input sits under one of :data:`INPUT_KEYS`.
    """
    if isinstance(item, (tuple, list)):
        return item[0]
    if isinstance(item, Mapping):
        inputs = {k: v for k, v in item.items() if k not in LABEL_KEYS and v is not None and not _is_text(v)}
        if not inputs:
            raise ValfreeError(
                f"a data item is a dict with keys {sorted(item)}, none of which is an input: every key but the "
                f"labels ({', '.join(LABEL_KEYS)}) is passed to the model, and strings are left out."
            )
        if len(inputs) == 1:
            (key, value), = inputs.items()
            if key in INPUT_KEYS:
                return value
        return inputs
    return item


def label_of(item):
    """The labels of a data item or batch, or None when it has none: callers say what that means for them."""
    if isinstance(item, (tuple, list)):
        return item[1] if len(item) >= 2 else None
    if isinstance(item, Mapping):
        for key in LABEL_KEYS:
            if key in item:
                return item[key]
    return None


def split_batch(batch) -> tuple[object, object]:
    """``(input_of(batch), label_of(batch))``; the labels are None when the batch has none."""
    return input_of(batch), label_of(batch)


def move_to(batch, device: torch.device | str, dtype: torch.dtype | None = None):
    """``batch`` (tensor, tuple, list or mapping, nested) on ``device``; floating tensors cast to ``dtype``
    when one is given. A mapping comes back as a plain dict. Anything else is returned as it is."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_to(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device, dtype) for v in batch)
    return batch


def batch_size_of(inputs) -> int:
    """How many samples ``inputs`` (a tensor, or the first tensor of a tuple or mapping) holds along dim 0."""
    tensor = _first_tensor(inputs)
    if tensor is None or tensor.dim() == 0:
        raise ValfreeError(f"cannot tell the batch size of {type(inputs).__name__} inputs: no tensor with a batch dimension.")
    return int(tensor.shape[0])


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    values = value.values() if isinstance(value, Mapping) else value if isinstance(value, (tuple, list)) else ()
    for v in values:
        found = _first_tensor(v)
        if found is not None:
            return found
    return None


def take(batch, index):
    """The rows ``index`` (a slice, an index tensor or a list of ints) of every tensor in ``batch``
    along dim 0, keeping its form; a list of strings (a text column) is indexed too, other values kept."""
    if isinstance(batch, torch.Tensor):
        return batch[index]
    if isinstance(batch, Mapping):
        return {k: take(v, index) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(take(v, index) for v in batch)
    if isinstance(batch, list) and _is_text(batch):
        if isinstance(index, slice):
            return batch[index]
        return [batch[int(i)] for i in torch.as_tensor(index).reshape(-1).tolist()]
    if isinstance(batch, list):
        return [take(v, index) for v in batch]
    return batch


def pad_token_id(model: nn.Module | None) -> int:
    """The pad token of a Hugging Face model (``config.pad_token_id``), 0 when it has none.

    A model that wraps one (a LightningModule or a DDP wrapper holding a transformers model) gives the
    pad token of the first submodule whose config names one.
    """
    modules = model.modules() if isinstance(model, nn.Module) else [model]
    for module in modules:
        value = getattr(getattr(module, "config", None), "pad_token_id", None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return 0


def collate(items: Sequence, pad_token_id: int = 0):
    """One batch from a list of data items, in the items' own form.

    Tensors, arrays and numbers are stacked along a new dim 0; strings stay a list. Sequences of
    unequal length (a tokenized dataset without padding) are padded on the right, as the Hugging Face
    Trainer's padding collator does: ``input_ids`` with ``pad_token_id`` (see :func:`pad_token_id`),
    labels with -100 (ignored by the loss), everything else with 0; when ``input_ids`` needed padding
    and the items carry no ``attention_mask``, one is added so that the padding is masked.
    """
    if not len(items):
        raise ValfreeError("cannot collate an empty list of data items.")
    first = items[0]
    if isinstance(first, Mapping):
        keys = list(first)
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or set(item) != set(keys):
                raise ValfreeError(
                    f"data item {i} has keys {sorted(item) if isinstance(item, Mapping) else type(item).__name__}, "
                    f"but item 0 has {sorted(keys)}; every item must have the same keys."
                )
        batch = {k: _collate_field(k, [item[k] for item in items], pad_token_id) for k in keys}
        if "input_ids" in batch and "attention_mask" not in batch:
            lengths = [_length(item["input_ids"]) for item in items]
            if len(set(lengths)) > 1:
                ids = batch["input_ids"]
                positions = torch.arange(ids.shape[1], device=ids.device)
                batch["attention_mask"] = (positions < torch.tensor(lengths, device=ids.device)[:, None]).long()
        return batch
    if isinstance(first, (tuple, list)) and not _is_text(first):
        if any(not isinstance(item, (tuple, list)) or len(item) != len(first) for item in items):
            raise ValfreeError(f"data items differ in form: item 0 is a {type(first).__name__} of {len(first)}, "
                               "and every item must be the same.")
        return tuple(collate([item[i] for item in items], pad_token_id) for i in range(len(first)))
    return _collate_field(None, list(items), pad_token_id)


def _length(value) -> int:
    tensor = torch.as_tensor(value)
    return int(tensor.shape[0]) if tensor.dim() else 1


def _collate_field(key, values: list, pad_token_id: int):
    if all(v is None or _is_text(v) for v in values):
        return list(values)
    what = f"the {key!r} entries" if key is not None else "the data items"
    try:
        tensors = [torch.as_tensor(v) for v in values]
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValfreeError(f"cannot turn {what} into tensors ({type(exc).__name__}: {exc}).") from None
    shapes = {tuple(t.shape) for t in tensors}
    if len(shapes) == 1:
        return torch.stack(tensors)
    if len({t.dim() for t in tensors}) != 1 or tensors[0].dim() == 0 or len({tuple(t.shape[1:]) for t in tensors}) != 1:
        raise ValfreeError(
            f"{what} have shapes {sorted(shapes)[:4]}, which differ in more than their length along dim 0, "
            "so they cannot be padded into one batch; pad or resize them in the dataset."
        )
    value = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
    return torch.nn.utils.rnn.pad_sequence(tensors, batch_first=True, padding_value=value)


def keyword_inputs(model: nn.Module, inputs: Mapping) -> dict:
    """The entries of ``inputs`` that ``model.forward`` takes by name (all of them when it has
    ``**kwargs``), as the Hugging Face Trainer drops the columns its model does not take."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):  # no signature to read: pass everything
        return dict(inputs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return dict(inputs)
    names = {p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
    return {k: v for k, v in inputs.items() if k in names}


def forward(model: nn.Module, inputs):
    """Call ``model`` on ``inputs``: a tensor, a tuple of positional arguments, or a mapping of keyword
    arguments (filtered by :func:`keyword_inputs`; a mapping none of whose keys the model takes, but
    with one entry under :data:`INPUT_KEYS`, passes that entry positionally)."""
    args, kwargs = call_args(model, inputs)
    return model(*args, **kwargs)


def call_args(model: nn.Module, inputs) -> tuple[tuple, dict]:
    """The positional and keyword arguments :func:`forward` calls ``model`` with, for callers that call
    it another way (``torch.func.functional_call``)."""
    if isinstance(inputs, Mapping):
        kwargs = keyword_inputs(model, inputs)
        if kwargs:
            return (), kwargs
        lone = [k for k in inputs if k in INPUT_KEYS]
        if len(lone) == 1:
            return (inputs[lone[0]],), {}
        try:
            takes = ", ".join(inspect.signature(model.forward).parameters)
        except (TypeError, ValueError):
            takes = "?"
        raise ValfreeError(
            f"the inputs are a dict with keys {sorted(inputs)}, none of which {type(model).__name__}.forward({takes}) "
            "takes by name; rename the dataset's keys to the model's argument names."
        )
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    return (inputs,), {}


def map_tensors(fn, batch):
    """``batch`` with ``fn`` applied to every tensor in it (nested tuples, lists and mappings keep
    their form; a mapping comes back as a plain dict); anything else is kept as it is."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, Mapping):
        return {k: map_tensors(fn, v) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(map_tensors(fn, v) for v in batch)
    return batch


def describe(batch) -> str:
    """The shapes of a batch for a message: ``(8, 3, 32, 32)`` or ``{input_ids: (8, 12), ...}``."""
    if isinstance(batch, torch.Tensor):
        return str(tuple(batch.shape))
    if isinstance(batch, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in batch.items()) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe(v) for v in batch) + ")"
    return type(batch).__name__


def logits_of(output):
    """The tensor a model's output stands for: itself, the ``logits`` entry of a dict or Hugging Face
    ``ModelOutput`` (which may also hold a loss), or else its first tensor, depth first; None if none."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        if isinstance(output.get("logits"), torch.Tensor):
            return output["logits"]
        values = list(output.values())
    elif isinstance(output, (tuple, list)):
        values = list(output)
    elif isinstance(getattr(output, "logits", None), torch.Tensor):
        return output.logits
    else:
        return None
    for v in values:
        found = logits_of(v)
        if found is not None:
            return found
    return None


def concat(batches: Sequence, pad_token_id: int = 0):
    """One batch from several (e.g. a DataLoader's), in their form, along dim 0. Token tensors
    (batch, length) of different lengths are padded on the right as :func:`collate` pads them (``input_ids`` with
    ``pad_token_id``, labels with -100, the rest with 0); text columns are joined."""
    if not len(batches):
        raise ValfreeError("cannot join an empty list of batches.")
    first = batches[0]
    if isinstance(first, Mapping):
        keys = list(first)
        if any(not isinstance(b, Mapping) or set(b) != set(keys) for b in batches):
            raise ValfreeError(f"the batches differ in their keys; the first has {sorted(keys)}.")
        return {k: _concat_field(k, [b[k] for b in batches], pad_token_id) for k in keys}
    if isinstance(first, (tuple, list)) and not _is_text(first):
        if any(not isinstance(b, (tuple, list)) or len(b) != len(first) for b in batches):
            raise ValfreeError(f"the batches differ in form: the first is a {type(first).__name__} of {len(first)}.")
        return tuple(concat([b[i] for b in batches], pad_token_id) for i in range(len(first)))
    return _concat_field(None, list(batches), pad_token_id)


def _concat_field(key, parts: list, pad_token_id: int):
    if all(isinstance(p, list) and (not p or _is_text(p)) for p in parts):
        return [v for p in parts for v in p]
    parts = [torch.as_tensor(p) for p in parts]
    if len({p.dim() for p in parts}) != 1 or parts[0].dim() == 0:
        raise ValfreeError(f"cannot join {f'the {key!r} entries' if key else 'the batches'}: their shapes are "
                           f"{[tuple(p.shape) for p in parts][:4]}.")
    if parts[0].dim() == 2:  # (batch, tokens): padded batches of different lengths
        width = max(p.shape[1] for p in parts)
        value = pad_token_id if key == "input_ids" else PAD_VALUES.get(key, 0)
        parts = [torch.nn.functional.pad(p, (0, width - p.shape[1]), value=value) if p.shape[1] < width else p
                 for p in parts]
    try:
        return torch.cat(parts)
    except RuntimeError as exc:
        raise ValfreeError(f"cannot join {f'the {key!r} entries' if key else 'the batches'}: {exc}") from None
