"""The head-gradient probe in closed form.

Features Z (N x d) are the head's input, detached; the head is W (C x d) plus a bias b; logits are
A = Z W^T + b. With R = dL/dA the per-sample residual,

    grad_W = R^T Z,   grad_b = sum_n R_n,   ||grad_W||_F^2 = sum_ij (R R^T)_ij (Z Z^T)_ij.

For mean cross-entropy R = (softmax(A) - Y) / N, where Y is one-hot, smoothed or soft; rows with
``ignore_index`` are zero and N counts the others, as ``torch.nn.functional.cross_entropy`` does. For
multi-label BCE (mean over all N*C entries) R = (sigmoid(A) - Y) / (N C). For any other loss on the
logits R comes from autograd on the logits alone. A dense head (a 1x1 convolution, or a Linear over
tokens) counts every location as a sample.

Regression heads (box sizes, diffusion noise) use ``"mse"`` or ``"l1"``, the mean over every entry
that has a target: R = 2 (A - Y) / M or sign(A - Y) / M, with M the count of non-NaN targets, so a
NaN target marks an entry (a location without an object) that the loss ignores. ``"focal"`` is
CenterNet's heatmap loss (:mod:`valfree.probes.losses`), whose R comes from autograd.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Callable, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ValfreeError
from .heads import Head, HeadCapture, capture_head, find_head
from .losses import centernet_focal_loss
from .readouts import sigmoid_readouts, softmax_readouts

LossSpec = Union[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]
PSEUDO = "pseudo"
LOSSES = ("ce", "bce", "focal", "mse", "l1")
REGRESSION_LOSSES = ("mse", "l1")
SIGMOID_LOSSES = ("bce", "focal")


@dataclass
class HeadGradient:
    """Result of one probe.

    ``grad_norm`` is ||grad_W||_F. ``score_w = grad_norm / ||W||_F`` (head-scale normalisation, the
    paper's choice for classic CNNs) and ``score_z = grad_norm / rms_n ||z_n||`` (feature-scale
    normalisation, for transformers and modern CNNs). ``bias_grad_norm`` is ||grad_b|| (0 without a
    bias). ``entropy``, ``confidence`` and ``margin`` are label-free means over the batch;
    ``batch_size`` counts the samples (locations, for dense heads) that entered the loss.
    """

    grad_norm: float
    score_w: float
    score_z: float
    bias_grad_norm: float
    loss: float
    entropy: float
    confidence: float
    margin: float
    batch_size: int
    weight_norm: float
    feature_rms: float
    path: str
    warnings: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        row = asdict(self)
        row["warnings"] = "; ".join(self.warnings)
        return row


def per_location(
    features: torch.Tensor, logits: torch.Tensor, channels_first: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flatten a head's input and output to (N, d) and (N, C) rows, one per sample or location.

    Linear heads act on the last dimension; 1x1 convolutions (``channels_first``) on dimension 1.
    """
    if channels_first:
        features, logits = features.movedim(1, -1), logits.movedim(1, -1)
    return features.reshape(-1, features.shape[-1]), logits.reshape(-1, logits.shape[-1])


def flatten_targets(targets: torch.Tensor, logits: torch.Tensor, channels_first: bool) -> torch.Tensor:
    """Flatten targets to match :func:`per_location`: (N,) class indices or (N, C) soft targets."""
    num_classes = logits.shape[1] if channels_first else logits.shape[-1]
    if targets.dtype in (torch.long, torch.int, torch.int16, torch.int8, torch.uint8):
        return targets.reshape(-1).long()
    if targets.dim() == logits.dim():
        t = targets.movedim(1, -1) if channels_first else targets
        return t.reshape(-1, num_classes)
    return targets.reshape(-1).long()


def residual(
    logits: torch.Tensor,
    targets: torch.Tensor,
    loss: LossSpec = "ce",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (R, loss) with R = dL/dA for logits A of shape (N, C) and the mean loss L.

    ``targets`` are class indices (N,) or soft targets (N, C) for ``"ce"``; multi-hot or probabilities
    (N, C) for ``"bce"``; a heatmap in [0, 1] with 1 at object centres for ``"focal"``; real values
    (N, C), NaN where there is no target, for ``"mse"`` and ``"l1"`` (the mean runs over the others).
    A callable ``loss(logits, targets)`` gets R from autograd.
    """
    n, c = logits.shape
    if isinstance(loss, str) and loss == "focal":
        _check_same_shape("focal", targets, logits)
        loss = centernet_focal_loss
    if callable(loss):
        a = logits.detach().requires_grad_(True)
        with torch.enable_grad():
            value = loss(a, targets)
            (r,) = torch.autograd.grad(value, a)
        return r, value.detach()
    if loss == "bce":
        y = targets.to(logits.dtype)
        if y.shape != logits.shape:
            raise ValfreeError(f"BCE targets must have the logits' shape {tuple(logits.shape)}, got {tuple(y.shape)}.")
        value = F.binary_cross_entropy_with_logits(logits, y)
        return (torch.sigmoid(logits) - y) / (n * c), value
    if loss in REGRESSION_LOSSES:
        return _regression_residual(logits, targets, loss)
    if loss != "ce":
        raise ValfreeError(
            f"unknown loss {loss!r}; use one of {', '.join(LOSSES)} or a callable loss(logits, targets)."
        )
    logp = torch.log_softmax(logits, 1)
    if targets.dim() == 2:  # soft targets
        y = targets.to(logits.dtype)
        if label_smoothing:
            y = y * (1 - label_smoothing) + label_smoothing / c
        return (logp.exp() - y) / n, -(y * logp).sum() / n
    t = targets.long()
    valid = t != ignore_index
    bad = valid & ((t < 0) | (t >= c))
    if bad.any():
        raise ValfreeError(
            f"labels must lie in [0, {c - 1}] for a head with {c} outputs, but the batch holds "
            f"{int(t[bad][0])}; check the dataset's labels or the --head option."
        )
    n_valid = int(valid.sum())
    if n_valid == 0:
        raise ValfreeError("every target in the probe batch equals ignore_index, so there is nothing to probe.")
    # Y is the (smoothed) one-hot target; with it, CE = -sum_c Y_c log p_c, exactly as F.cross_entropy.
    y = F.one_hot(t.clamp(0, c - 1), c).to(logits.dtype)
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / c
    y = y * valid.unsqueeze(1)
    r = (logp.exp() * valid.unsqueeze(1) - y) / n_valid
    return r, -(y * logp).sum() / n_valid


def _check_same_shape(loss: str, targets: torch.Tensor, logits: torch.Tensor) -> None:
    if tuple(targets.shape) != tuple(logits.shape):
        raise ValfreeError(
            f"{loss} targets must have the head output's shape {tuple(logits.shape)} (one value per location "
            f"and output channel), got {tuple(targets.shape)}."
        )


def _regression_residual(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared or absolute error over the entries whose target is not NaN, and its residual."""
    _check_same_shape(loss, targets, logits)
    y = targets.to(logits.dtype)
    valid = ~torch.isnan(y)
    m = int(valid.sum())
    if m == 0:
        raise ValfreeError(f"every {loss} target in the probe batch is NaN (ignored), so there is nothing to probe.")
    diff = torch.where(valid, logits - y, torch.zeros((), dtype=logits.dtype, device=logits.device))
    if loss == "mse":
        return 2 * diff / m, diff.square().sum() / m
    # d|x|/dx = sign(x), 0 at 0, as autograd's abs backward.
    return torch.sign(diff) / m, diff.abs().sum() / m


def gram_is_cheaper(n: int, c: int, d: int) -> bool:
    """The Gram form costs N^2 (C + d), the direct product N C d."""
    return n * (c + d) < c * d


def weight_grad_norm_sq(r: torch.Tensor, z: torch.Tensor, path: str = "auto") -> tuple[torch.Tensor, str]:
    """||R^T Z||_F^2, by the Gram identity or the direct product, whichever is cheaper for the shapes."""
    n, c = r.shape
    d = z.shape[1]
    if path == "auto":
        path = "gram" if gram_is_cheaper(n, c, d) else "direct"
    if path == "gram":
        return ((r @ r.T) * (z @ z.T)).sum(), path
    if path == "direct":
        return (r.T @ z).square().sum(), path
    raise ValfreeError(f"unknown path {path!r}; use 'auto', 'gram' or 'direct'.")


def head_gradient_from_features(
    features: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor | str | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    loss: LossSpec = "ce",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    path: str = "auto",
) -> HeadGradient:
    """The probe from a head's captured input and output, with no model call.

    ``features`` and ``logits`` are the head's input and output as the forward pass produced them
    (any leading shape; channels first for convolutions). ``targets="pseudo"`` (or None) uses the
    model's own argmax, for unlabeled data. This is what the plain-loop Monitor's piggyback mode calls.
    """
    channels_first = weight.dim() > 2  # convolution weights are (C, d, 1, ...)
    z, a = per_location(features.detach(), logits.detach(), channels_first)
    compute_dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    z, a = z.to(compute_dtype), a.to(compute_dtype)
    if not torch.isfinite(a).all():
        raise ValfreeError("the model produced NaN or infinite logits on the probe batch, so the checkpoint cannot be scored.")
    warnings: list[str] = []
    if targets is None or (isinstance(targets, str) and targets == PSEUDO):
        if loss in REGRESSION_LOSSES:
            raise ValfreeError(
                f"pseudo targets are defined for classification losses (ce, bce, focal), not {loss!r}; "
                "a regression head needs its targets."
            )
        t = torch.sigmoid(a).round() if loss in SIGMOID_LOSSES else a.argmax(1)
    elif isinstance(targets, str):
        raise ValfreeError(f"targets must be a tensor or 'pseudo', not {targets!r}.")
    else:
        if isinstance(loss, str) and loss in REGRESSION_LOSSES + ("focal",):
            _check_same_shape(loss, targets, logits)  # before flattening, so the message shows the real shapes
        t = flatten_targets(targets.to(a.device), logits, channels_first)
        if t.shape[0] != a.shape[0]:
            raise ValfreeError(
                f"the probe has {a.shape[0]} samples (or locations) but {t.shape[0]} targets; "
                "targets must match the model's output, one per sample or location."
            )
    ignored = None
    if loss == "ce" and t.dim() == 1:
        ignored = t == ignore_index
        labelled = t[~ignored] if bool(ignored.any()) else t
        if labelled.numel() and bool((labelled == labelled[0]).all()):
            warnings.append(
                f"the probe batch holds a single class ({int(labelled[0])}), so the score says little about "
                "separability; use a batch that spans the classes"
            )
    r, value = residual(a, t, loss=loss, label_smoothing=label_smoothing, ignore_index=ignore_index)
    keep = None
    if ignored is not None and bool(ignored.any()):
        keep = ~ignored
    elif loss in REGRESSION_LOSSES and torch.isnan(t).any():
        keep = ~torch.isnan(t).all(1)  # locations without any target (no object there) are not samples
    rz, zz = (r[keep], z[keep]) if keep is not None else (r, z)
    n_used = int(rz.shape[0])
    norm_sq, used_path = weight_grad_norm_sq(rz, zz, path)
    grad_norm = float(norm_sq.clamp_min(0).sqrt())
    w = weight.detach().to(compute_dtype)
    weight_norm = float(w.norm())
    feature_rms = float(zz.square().sum(1).mean().sqrt()) if n_used else 0.0
    bias_grad_norm = float(r.sum(0).norm()) if bias is not None else 0.0
    if loss in REGRESSION_LOSSES:  # a regression output has no class probabilities to read out
        reads = {"entropy": float("nan"), "confidence": float("nan"), "margin": float("nan")}
    elif loss in SIGMOID_LOSSES:
        reads = sigmoid_readouts(a)
    else:
        reads = softmax_readouts(a)
    return HeadGradient(
        grad_norm=grad_norm,
        score_w=grad_norm / weight_norm if weight_norm > 0 else float("inf"),
        score_z=grad_norm / feature_rms if feature_rms > 0 else float("inf"),
        bias_grad_norm=bias_grad_norm,
        loss=float(value),
        batch_size=n_used,
        weight_norm=weight_norm,
        feature_rms=feature_rms,
        path=used_path,
        warnings=warnings,
        **reads,
    )


def call_model(model: nn.Module, inputs):
    """Forward ``inputs`` as a tensor, a tuple of positional arguments, or a dict of keyword arguments."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


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


def head_gradient(
    model: nn.Module,
    inputs,
    targets: torch.Tensor | str | None = None,
    head: str | nn.Module | None = None,
    loss: LossSpec = "ce",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    path: str = "auto",
    train_mode: bool = False,
) -> HeadGradient:
    """Probe ``model`` on one batch: the norm of the classifier-head gradient on detached features.

    The model runs once under ``torch.no_grad()`` in eval mode (``train_mode=True`` keeps training
    mode, e.g. to match a piggybacked training step); its mode is restored afterwards and the hook
    on the head is removed, so the model is left as it was. ``targets`` are class indices, soft
    targets, multi-hot vectors (``loss="bce"``), or ``"pseudo"``/None for the model's own argmax.
    ``head`` is found with :func:`find_head` when not given. See :class:`HeadGradient` for the fields.
    """
    found: Head = find_head(model, head)
    (cap,) = capture_forward(model, inputs, [found], train_mode)
    return head_gradient_from_features(
        cap.features,
        cap.logits,
        targets,
        found.weight,
        found.bias,
        loss=loss,
        label_smoothing=label_smoothing,
        ignore_index=ignore_index,
        path=path,
    )
