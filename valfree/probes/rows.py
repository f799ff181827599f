"""From a head's captured input and output to the rows the probe works on, for every probe path.

The single-process probe and the distributed one both start here, so that they flatten, cast and
read targets the same way: features and logits become (N, d) and (N, C) rows, one per sample or
location; targets become class indices (N,) or per-class values (N, C), and ``"pseudo"`` becomes
the model's own prediction for the loss in use.
"""

from __future__ import annotations

import torch

from ..errors import ValfreeError
from .readouts import sigmoid_readout_tensor, softmax_readout_tensor

PSEUDO = "pseudo"
NON_FINITE_LOGITS = "the model produced NaN or infinite logits on the probe batch, so the checkpoint cannot be scored."
LOSSES = ("ce", "bce", "focal", "mse", "l1")
REGRESSION_LOSSES = ("mse", "l1")
SIGMOID_LOSSES = ("bce", "focal")  # one sigmoid per output: multi-label BCE and CenterNet's focal heatmaps


def per_location(
    features: torch.Tensor, logits: torch.Tensor, channels_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten a head's input and output to (N, d) and (N, C) rows, one per sample or location.

    Linear heads act on the last dimension; 1x1 convolutions (``channels_first``) on dimension 1.
    """
    if channels_first:
        features, logits = features.movedim(1, -1), logits.movedim(1, -1)
    elif features.dim() == 2 and logits.dim() == 2:
        return features, logits  # already rows; skipping the no-op reshapes matters in piggyback mode
    return features.reshape(-1, features.shape[-1]), logits.reshape(-1, logits.shape[-1])


def detached(x: torch.Tensor) -> torch.Tensor:
    """``x`` cut from the graph, without a call when it already is: in piggyback mode the probe runs
    after a backward pass, where each tensor call, even a no-op, costs tens of microseconds."""
    return x.detach() if x.requires_grad else x


def flatten_targets(targets: torch.Tensor, logits: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """Flatten targets to match :func:`per_location`: (N,) class indices or (N, C) soft targets."""
    num_classes = logits.shape[1] if channels_first else logits.shape[-1]
    if targets.dtype == torch.long and targets.dim() == 1:
        return targets
    if targets.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return targets.reshape(-1).long()
    if targets.dim() == logits.dim():
        t = targets.movedim(1, -1) if channels_first else targets
        return t.reshape(-1, num_classes)
    return targets.reshape(-1).long()


def check_same_shape(loss: str, targets: torch.Tensor, logits: torch.Tensor) -> None:
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValfreeError(
            f"{loss} targets must have the head output's shape {tuple(logits.shape)} (one value per location "
            f"and output channel), got {tuple(targets.shape)}."
        )


def pseudo_targets(a: torch.Tensor, loss) -> torch.Tensor:
    """The model's own prediction as targets: each sigmoid rounded for the sigmoid losses, else the argmax."""
    return torch.sigmoid(a).round() if loss in SIGMOID_LOSSES else a.argmax(1)


def probe_rows(features: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Z, A): the head's input and output as detached rows, in float32 at least (half precision
    would round the Gram products)."""
    z, a = per_location(detached(features), detached(logits), weight.dim() > 2)  # conv weights are (C, d, 1, ...)
    compute_dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    if z.dtype != compute_dtype or a.dtype != compute_dtype:
        z, a = z.to(compute_dtype), a.to(compute_dtype)
    return z, a


def probe_targets(targets, a: torch.Tensor, logits: torch.Tensor, weight: torch.Tensor, loss) -> torch.Tensor:
    """The targets of rows ``a`` (from :func:`probe_rows` of ``logits``): a tensor flattened to match,
    or the pseudo-targets for ``"pseudo"``/None. A mismatch is a :class:`ValfreeError`."""
    if targets is None or (isinstance(targets, str) and targets == PSEUDO):
        if loss in REGRESSION_LOSSES:
            raise ValfreeError(
                f"pseudo targets are defined for classification losses (ce, bce, focal), not {loss!r}; "
                "a regression head needs its targets."
            )
        return pseudo_targets(a, loss)
    if isinstance(targets, str):
        raise ValfreeError(f"targets must be a tensor or 'pseudo', not {targets!r}.")
    if isinstance(loss, str) and loss in REGRESSION_LOSSES + ("focal",):
        check_same_shape(loss, targets, logits)  # before flattening, so the message shows the real shapes
    t = flatten_targets(targets if targets.device == a.device else targets.to(a.device), logits, weight.dim() > 2)
    if t.shape[0] != a.shape[0]:
        raise ValfreeError(
            f"the probe has {a.shape[0]} samples (or locations) but {t.shape[0]} targets; "
            "targets must match the model's output, one per sample or location."
        )
    return t


def readout_tensor(a: torch.Tensor, loss, logp: torch.Tensor | None = None) -> torch.Tensor:
    """(entropy, confidence, margin) of rows ``a`` for the loss in use: per-output sigmoids for the
    sigmoid losses, NaN for regression (no class probabilities), else the softmax."""
    if loss in REGRESSION_LOSSES:
        return a.new_full((3,), float("nan"))
    return sigmoid_readout_tensor(a) if loss in SIGMOID_LOSSES else softmax_readout_tensor(a, logp)
