"""The options of one probe, as one value: the head, the loss and how targets are read.

:func:`valfree.head_gradient`, the Monitor, the Lightning and Hugging Face callbacks and the
distributed probe all take these options; each keeps its own keyword arguments for users and builds a
:class:`ProbeOptions` from them, so that a new option is declared once and every caller passes it on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
from torch import nn

LossSpec = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]


@dataclass(frozen=True)
class ProbeOptions:
    """How to probe, independent of the batch.

    ``head``: the head module or its qualified name (None: found by :func:`valfree.find_head`).
    ``loss``: ``"ce"``, ``"bce"``, ``"focal"``, ``"mse"``, ``"l1"`` or a callable ``loss(logits, targets)``.
    ``label_smoothing`` and ``ignore_index``: as for ``torch.nn.functional.cross_entropy``.
    ``path``: ``"auto"``, ``"gram"`` or ``"direct"``, the way ||R^T Z|| is computed.
    """

    head: str | nn.Module | None = None
    loss: LossSpec = "ce"
    label_smoothing: float = 0.0
    ignore_index: int = -100
    path: str = "auto"

    def loss_options(self) -> dict:
        """The keyword arguments of the probe of captured features: every option but the head."""
        return {"loss": self.loss, "label_smoothing": self.label_smoothing, "ignore_index": self.ignore_index,
                "path": self.path}
