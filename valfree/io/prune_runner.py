"""``valfree prune``: load a checkpoint through its factory, prune it, print the table, save it factory-free.

The layers below do the work: :func:`valfree.io.build_model` and :func:`valfree.io.load_into` (safe
checkpoint loading), :func:`valfree.io.load_dataset` (data specs), :func:`valfree.pruning.prune` and
:func:`valfree.pruning.save_pruned`. This module only wires them together for the command line.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch.utils.data import Subset

from ..errors import ValfreeError
from .checkpoints import load_into
from .data import load_dataset
from .factory import build_model


def prune_checkpoint(checkpoint: str | os.PathLike, *, model_spec: str, data_spec: str, output: str | os.PathLike,
                     criterion: str = "jbr", ratio: float = 0.5, steps: int = 10, target: str = "channels",
                     test_data: str | None = None, test_size: int | None = 2000, **prune_options):
    """Prune the model in ``checkpoint`` and write it to ``output``; returns the PruneResult.

    ``test_data`` is a data spec whose 'test' split (its first ``test_size`` items, seeded) is used to
    report accuracy; it never influences the pruning.
    """
    from ..pruning import get_criterion, prune, save_pruned
    from ..pruning.runner import check_arguments

    output = Path(output)
    _check_writable(output)
    get_criterion(criterion)  # fail on a typo before loading anything
    check_arguments(ratio, steps, target, prune_options.get("finetune_steps", 0))
    if not model_spec:
        raise ValfreeError("--model MODULE:FACTORY is required: pruning needs the architecture the checkpoint fits.")
    model = build_model(model_spec)
    load_into(model, checkpoint)
    data = load_dataset(data_spec, "train")
    eval_data = None
    if test_data:
        eval_data = load_dataset(test_data, "test")
        if test_size is not None and test_size < len(eval_data):
            g = torch.Generator().manual_seed(0)
            eval_data = Subset(eval_data, torch.randperm(len(eval_data), generator=g)[:test_size].tolist())
    result = prune(model, data, criterion, ratio, steps, target=target, eval_data=eval_data, **prune_options)
    info = {"checkpoint": str(checkpoint), "model": model_spec, "data": data_spec, **result.to_dict()}
    save_pruned(result.model, output, result.example_inputs, info=info)
    return result


def _check_writable(output: Path) -> None:
    """Fail before the (long) pruning run, not after it."""
    if output.is_dir():
        raise ValfreeError(f"the output {output} is a folder; give a file name such as "
                           f"{output / 'pruned.safetensors'}.")
    parent = output.parent if str(output.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ValfreeError(f"cannot write {output}: the folder {parent} is not writable.")
