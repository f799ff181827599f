"""One forward pass that records what the heads saw: their input and output, detached."""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ..errors import ValfreeError
from ..batches import forward
from .heads import Head, HeadCapture, capture_head


def call_model(model: nn.Module, inputs):
    """Forward ``inputs`` as a tensor, a tuple of positional arguments, or a mapping of keyword
    arguments (HF ``BatchEncoding`` too, filtered to what ``forward`` takes)."""
    return forward(model, inputs)


def parameter_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (the default dtype if it has none): the
    dtype a probe batch's floating inputs are cast to before the forward pass."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def capture_forward(model: nn.Module, inputs, heads: list[Head], train_mode: bool = False) -> list[HeadCapture]:
    """One forward pass under ``torch.no_grad()`` that records every head's input and output, detached.

    The model runs in eval mode (``train_mode=True`` keeps training mode) and is restored afterwards;
    the hooks are removed. A head that was not called, or was called more than once (its gradient
    would sum over the calls, which one capture cannot hold), is a :class:`ValfreeError`.
    """
    was_training = model.training
    model.train(train_mode)
    try:
        with torch.no_grad(), contextlib.ExitStack() as stack:
            caps = [stack.enter_context(capture_head(h)) for h in heads]
            call_model(model, inputs)
    finally:
        model.train(was_training)
    for h, cap in zip(heads, caps):
        if cap.features is None:
            raise ValfreeError(
                f"the head {h.name!r} was not called during the forward pass; pass head='name' with the "
                "module that produces the logits."
            )
        if cap.calls > 1:
            raise ValfreeError(
                f"the head {h.name!r} was called {cap.calls} times in one forward pass (shared across inputs "
                "or feature levels); valfree supports heads applied once per forward."
            )
    return caps
