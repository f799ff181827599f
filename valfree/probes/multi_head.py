"""Several heads probed in one forward pass, e.g. a detector's heatmap and box heads.

Each head k has its own loss L_k and weight W_k and is probed exactly as :func:`head_gradient` probes
one head. The combined score is the probe of the detector's total loss L = sum_k lambda_k L_k (the
``weights`` lambda_k, default 1) with respect to every head weight at once. The heads hold disjoint
parameters, so that joint gradient is the concatenation of lambda_k grad_{W_k} L_k and

    grad_norm = sqrt(sum_k lambda_k^2 ||grad_{W_k} L_k||_F^2),
    score_w   = grad_norm / sqrt(sum_k ||W_k||_F^2)           (the norm of the concatenated weights),
    score_z   = sqrt(sum_k lambda_k^2 score_z_k^2)            (each head's features at unit RMS),
    loss      = sum_k lambda_k L_k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import torch
from torch import nn

from ..errors import ValfreeError
from .forward import capture_forward
from .head_gradient import HeadGradient, LossSpec, head_gradient_from_features
from .heads import find_head


@dataclass
class MultiHeadGradient:
    """The combined probe (fields as in :class:`HeadGradient`) and each head's own result in ``heads``."""

    grad_norm: float
    score_w: float
    score_z: float
    loss: float
    weight_norm: float
    heads: dict[str, HeadGradient]
    loss_weights: dict[str, float]
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """A flat row: the combined fields, then ``NAME.FIELD`` for every head's numeric fields."""
        row = {k: getattr(self, k) for k in ("grad_norm", "score_w", "score_z", "loss", "weight_norm")}
        row["batch_size"] = sum(h.batch_size for h in self.heads.values())
        row["path"] = ",".join(f"{n}:{h.path}" for n, h in self.heads.items())
        for name, h in self.heads.items():
            for key, value in h.as_dict().items():
                if key not in ("warnings", "path"):
                    row[f"{name}.{key}"] = value
        row["warnings"] = "; ".join(self.warnings + [f"{n}: {w}" for n, h in self.heads.items() for w in h.warnings])
        return row


def combine(results: Mapping[str, HeadGradient], loss_weights: Mapping[str, float] | None = None) -> MultiHeadGradient:
    """The combined score of several per-head results (see the module docstring for the definition)."""
    if not results:
        raise ValfreeError("combine() needs at least one head result.")
    lam = {name: float((loss_weights or {}).get(name, 1.0)) for name in results}
    grad_sq = sum(lam[n] ** 2 * h.grad_norm**2 for n, h in results.items())
    weight_norm = math.sqrt(sum(h.weight_norm**2 for h in results.values()))
    grad_norm = math.sqrt(grad_sq)
    return MultiHeadGradient(
        grad_norm=grad_norm,
        score_w=grad_norm / weight_norm if weight_norm > 0 else float("inf"),
        score_z=math.sqrt(sum(lam[n] ** 2 * h.score_z**2 for n, h in results.items())),
        loss=sum(lam[n] * h.loss for n, h in results.items()),
        weight_norm=weight_norm,
        heads=dict(results),
        loss_weights=lam,
    )


def head_gradients(
    model: nn.Module,
    inputs,
    targets: Mapping[str, torch.Tensor | str | None],
    losses: Mapping[str, LossSpec],
    loss_weights: Mapping[str, float] | None = None,
    ignore_index: int = -100,
    path: str = "auto",
    train_mode: bool = False,
) -> MultiHeadGradient:
    """Probe several heads of ``model`` in one forward pass.

    ``losses`` maps each head's qualified module name to its loss (``"ce"``, ``"bce"``, ``"focal"``,
    ``"mse"``, ``"l1"`` or a callable) and ``targets`` maps the same names to that head's targets.
    ``loss_weights`` are the lambda_k of the training loss (default 1 each); they scale each head's
    part of the combined score, not the per-head results.
    """
    if not losses:
        raise ValfreeError("head_gradients() needs at least one head in losses={name: loss}.")
    missing = [n for n in losses if n not in targets]
    if missing:
        raise ValfreeError(f"no targets for head(s) {', '.join(map(repr, missing))}; pass targets={{name: tensor}} for every head.")
    unknown = [n for n in (loss_weights or {}) if n not in losses]
    if unknown:
        raise ValfreeError(f"loss_weights names head(s) {', '.join(map(repr, unknown))} that are not in losses.")
    found = [find_head(model, name) for name in losses]
    seen: dict[int, str] = {}
    for h in found:
        if id(h.module) in seen:
            raise ValfreeError(f"heads {seen[id(h.module)]!r} and {h.name!r} are the same module; list it once.")
        seen[id(h.module)] = h.name
    captures = capture_forward(model, inputs, found, train_mode)
    results = {}
    for name, h, cap in zip(losses, found, captures):
        results[name] = head_gradient_from_features(
            cap.features, cap.logits, targets[name], h.weight, h.bias,
            loss=losses[name], ignore_index=ignore_index, path=path,
        )
    return combine(results, loss_weights)
