"""Every pruning criterion behind one name: ``make_importance("jbr")``, ``make_importance("fpgm")``...

Torch-Pruning's own importances are used where they are correct; valfree adds JBR, the labelled
Jacobian criterion, WHC, and repaired Taylor and Hessian importances (see
:mod:`valfree.pruning.baselines`). All of them accept Torch-Pruning's ``group_reduction`` and
``normalizer`` options except ``random``.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Callable

import torch_pruning as tp

from ..errors import ValfreeError
from .baselines import HessianImportance, TaylorImportance, WHCImportance
from .importance import JacobianImportance, JBRImportance


@dataclass(frozen=True)
class Criterion:
    """A named criterion: how to build its importance, and whether it reads labels or data."""

    name: str
    build: Callable[..., object]
    uses_labels: bool
    uses_data: bool
    description: str
    source: str


CRITERIA: dict[str, Criterion] = {
    c.name: c
    for c in (
        Criterion("jbr", JBRImportance, False, True,
                  "first-order change of the pseudo-label NLL, squared per batch (label-free)", "valfree"),
        Criterion("jacobian", JacobianImportance, True, True,
                  "the same score with the true labels (Jacobian criterion, Chen et al. 2025)", "valfree"),
        Criterion("l1", lambda **kw: tp.importance.GroupMagnitudeImportance(p=1, **kw), False, False,
                  "L1 norm of the channel's weights", "torch-pruning"),
        Criterion("bn_scale", tp.importance.BNScaleImportance, False, False,
                  "|gamma| of the BatchNorm after the channel (network slimming)", "torch-pruning"),
        Criterion("fpgm", tp.importance.FPGMImportance, False, False,
                  "distance to the other filters (geometric median)", "torch-pruning"),
        Criterion("whc", WHCImportance, False, False,
                  "filter norm times norm-weighted dissimilarity (weighted hybrid criterion)", "valfree"),
        Criterion("random", lambda **kw: tp.importance.RandomImportance(), False, False,
                  "uniformly random scores, the floor every criterion must beat", "torch-pruning"),
        Criterion("taylor", TaylorImportance, True, True,
                  "|w * dL/dw| of the labelled loss (Molchanov et al. 2019)", "torch-pruning, BatchNorm term fixed"),
        Criterion("hessian", HessianImportance, True, True,
                  "w^2 * E[g^2] of the labelled loss (group OBD)", "torch-pruning, accumulator fixed"),
    )
}
LABEL_FREE = tuple(name for name, c in CRITERIA.items() if not c.uses_labels)


def get_criterion(name: str) -> Criterion:
    key = name.strip().lower().replace("-", "_")
    if key in CRITERIA:
        return CRITERIA[key]
    close = difflib.get_close_matches(key, list(CRITERIA), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise ValfreeError(f"unknown pruning criterion {name!r}; choose one of {', '.join(CRITERIA)}.{hint}")


def make_importance(name: str, *, confidence: float = 0.9, group_reduction: str = "mean",
                    normalizer: str | None = "mean"):
    """Build the Torch-Pruning importance for criterion ``name`` (see :data:`CRITERIA`)."""
    criterion = get_criterion(name)
    if criterion.name == "random":
        return criterion.build()
    if criterion.name == "jbr":
        return criterion.build(confidence=confidence, group_reduction=group_reduction, normalizer=normalizer)
    return criterion.build(group_reduction=group_reduction, normalizer=normalizer)
