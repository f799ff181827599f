"""The options of a pruning run, importable without Torch-Pruning (the CLI builds its parser from them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..errors import ValfreeError

TARGETS = ("channels", "params", "macs")


@dataclass(frozen=True)
class PruneOptions:
    """Every option of :func:`prune` but the model, the data, the criterion, the ratio and the steps;
    :func:`prune` documents each. One object, so that a caller (``valfree prune``) passes them on whole."""

    target: str = "channels"
    global_pruning: bool = False
    confidence: float = 0.9
    group_reduction: str = "mean"
    normalizer: str | None = "mean"
    calibration_size: int | None = 1024
    batch_size: int = 64
    recalibrate_bn: bool = True
    finetune_steps: int = 0
    finetune_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None
    finetune_lr: float = 0.01
    head: str | nn.Module | None = None
    ignored_layers: tuple = ()
    device: torch.device | str | None = None
    seed: int = 0
    inplace: bool = False
    pruner_options: dict = field(default_factory=dict)


def check_arguments(ratio, steps, target, finetune_steps) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 < float(ratio) < 1.0:
        raise ValfreeError(f"ratio must be a fraction strictly between 0 and 1 (0.5 removes half), not {ratio!r}.")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValfreeError(f"steps must be a positive integer, not {steps!r}.")
    if target not in TARGETS:
        raise ValfreeError(f"target must be one of {', '.join(TARGETS)}, not {target!r}.")
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise ValfreeError(f"finetune_steps must be a non-negative integer, not {finetune_steps!r}.")
