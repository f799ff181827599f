"""Where a data item or batch keeps its inputs and its labels, and moving a batch to a device.

Every layer that reads user data (pruning calibration, the dataset loaders, the training callbacks)
accepts the same forms: a tensor of inputs, a tuple or list ``(inputs, labels, ...)``, or a dict
keyed by one of :data:`INPUT_KEYS` and :data:`LABEL_KEYS`.
"""

from __future__ import annotations

import torch

from ..errors import ValfreeError

INPUT_KEYS = ("x", "input", "inputs", "image", "images", "pixel_values")
LABEL_KEYS = ("y", "label", "labels", "target", "targets")


def input_of(item):
    """The inputs of a data item or batch, touching nothing else in it (labels may be missing or broken)."""
    if isinstance(item, (tuple, list)):
        return item[0]
    if isinstance(item, dict):
        for key in INPUT_KEYS:
            if key in item:
                return item[key]
        raise ValfreeError(f"a data item is a dict with keys {sorted(item)}, none of which is an input "
                           f"({', '.join(INPUT_KEYS)}).")
    return item


def label_of(item):
    """The labels of a data item or batch, or None when it has none: callers say what that means for them."""
    if isinstance(item, (tuple, list)):
        return item[1] if len(item) >= 2 else None
    if isinstance(item, dict):
        for key in LABEL_KEYS:
            if key in item:
                return item[key]
    return None


def move_to(batch, device: torch.device | str, dtype: torch.dtype | None = None):
    """``batch`` (tensor, tuple, list or dict, nested) on ``device``; floating tensors cast to ``dtype``
    when one is given. Anything else is returned as it is."""
    if isinstance(batch, torch.Tensor):
        if dtype is not None and batch.is_floating_point():
            return batch.to(device=device, dtype=dtype)
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: move_to(v, device, dtype) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(move_to(v, device, dtype) for v in batch)
    return batch
