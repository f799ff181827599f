"""Recovery after a pruning step: fresh BatchNorm statistics, and a short label-free fine-tune."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ValfreeError
from ..batches import forward
from .importance import as_logits


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, inputs: list[torch.Tensor]) -> None:
    """Re-estimate the running mean and variance of every BatchNorm layer on ``inputs``.

    Pruning changes what downstream BatchNorm layers see, so their stored statistics go stale. With
    momentum None PyTorch keeps a cumulative average over the batches: the mean of the batch means
    (the exact mean when batches have equal size) and of the unbiased batch variances.
    """
    layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not layers:
        return
    was_training = model.training
    momenta = [m.momentum for m in layers]
    model.eval()  # dropout and friends stay off; only BatchNorm collects statistics
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    try:
        for x in inputs:
            forward(model, x)
    finally:
        for m, momentum in zip(layers, momenta):
            m.momentum = momentum
        model.train(was_training)


def distillation_loss(teacher: nn.Module) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
    """Cross-entropy of the student against the teacher's predicted probabilities (label-free)."""

    def loss(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target = torch.softmax(as_logits(forward(teacher, inputs)), dim=1)
        return F.cross_entropy(as_logits(forward(model, inputs)), target)

    return loss


def finetune(model: nn.Module, batches, loss_fn: Callable[[nn.Module, Any], torch.Tensor], lr: float = 0.01) -> None:
    """SGD with momentum over ``batches`` (one step each) on ``loss_fn(model, batch)``."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    for batch in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model, batch)
        if not torch.isfinite(loss):
            raise ValfreeError(f"the fine-tuning loss became {loss.item()}; lower finetune_lr (now {lr}).")
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    model.eval()
