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

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ValfreeError
from .forward import capture_forward
from .heads import Head, find_head
from .losses import centernet_focal_loss
from .options import LossSpec, ProbeOptions
from .rows import (
    LOSSES,
    NON_FINITE_LOGITS,
    REGRESSION_LOSSES,
    check_same_shape,
    detached,
    probe_rows,
    probe_targets,
    readout_tensor,
)


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

    @classmethod
    def from_norms(cls, grad_norm: float, weight_norm: float, feature_rms: float, **fields) -> "HeadGradient":
        """The result from ||grad_W||, ||W|| and rms ||z||: the normalised scores follow (inf for a zero norm)."""
        return cls(
            grad_norm=grad_norm,
            score_w=grad_norm / weight_norm if weight_norm > 0 else float("inf"),
            score_z=grad_norm / feature_rms if feature_rms > 0 else float("inf"),
            weight_norm=weight_norm,
            feature_rms=feature_rms,
            **fields,
        )

    def as_dict(self) -> dict:
        row = asdict(self)
        row["warnings"] = "; ".join(self.warnings)
        return row


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
        check_same_shape("focal", targets, logits)
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
    return ce_residual(torch.log_softmax(logits, 1), targets, label_smoothing, ignore_index)


def ce_residual(
    logp: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R, mean cross-entropy) from log-probabilities ``logp`` (N, C): R = (softmax - Y) / N_valid.

    Split from :func:`residual` so that a caller that also needs the softmax statistics computes the
    log-softmax once.
    """
    n, c = logp.shape
    if targets.dim() == 2:  # soft targets
        y = targets.to(logp.dtype)
        if label_smoothing:
            y = y * (1 - label_smoothing) + label_smoothing / c
        return (logp.exp() - y) / n, -(y * logp).sum() / n
    t = targets.long()
    valid = t != ignore_index
    n_valid, n_bad = torch.stack([valid.sum(), (valid & ((t < 0) | (t >= c))).sum()]).tolist()
    if n_bad:
        bad = valid & ((t < 0) | (t >= c))
        raise ValfreeError(
            f"labels must lie in [0, {c - 1}] for a head with {c} outputs, but the batch holds "
            f"{int(t[bad][0])}; check the dataset's labels or the --head option."
        )
    if n_valid == 0:
        raise ValfreeError("every target in the probe batch equals ignore_index, so there is nothing to probe.")
    if n_valid == n and not label_smoothing:
        # The common case, in two gathers/scatters instead of a dense one-hot.
        index = t.unsqueeze(1)
        r = logp.exp().scatter_add_(1, index, logp.new_full((n, 1), -1.0)).div_(n)
        return r, -logp.gather(1, index).sum() / n
    # Y is the (smoothed) one-hot target; with it, CE = -sum_c Y_c log p_c, exactly as F.cross_entropy.
    y = F.one_hot(t.clamp(0, c - 1), c).to(logp.dtype)
    if label_smoothing:
        y = y * (1 - label_smoothing) + label_smoothing / c
    y = y * valid.unsqueeze(1)
    r = (logp.exp() * valid.unsqueeze(1) - y) / n_valid
    return r, -(y * logp).sum() / n_valid


def single_class_warning(label: int) -> str:
    return (f"the probe batch holds a single class ({label}), so the score says little about separability; "
            "use a batch that spans the classes")


def _regression_residual(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean squared or absolute error over the entries whose target is not NaN, and its residual."""
    check_same_shape(loss, targets, logits)
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
        g = (r.T @ z).reshape(-1)
        return torch.dot(g, g), path  # one kernel: this runs in piggyback mode, where each distinct one costs
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
    return probe_features(features, logits, targets, weight, bias,
                          ProbeOptions(loss=loss, label_smoothing=label_smoothing, ignore_index=ignore_index, path=path))


def probe_features(features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor | str | None,
                   weight: torch.Tensor, bias: torch.Tensor | None, options: ProbeOptions) -> HeadGradient:
    """:func:`head_gradient_from_features` with its options as one :class:`ProbeOptions` (its head is not read)."""
    loss, label_smoothing, ignore_index, path = options.loss, options.label_smoothing, options.ignore_index, options.path
    z, a = probe_rows(features, logits, weight)
    t = probe_targets(targets, a, logits, weight, loss)
    warnings: list[str] = []
    c = a.shape[1]
    # The shortcut needs every label to be a real class: no smoothing, and an ignore_index that no
    # in-range label can equal (the default -100; 255 for segmentation with fewer classes).
    if loss == "ce" and t.dim() == 1 and not label_smoothing and t.numel() and c >= 2 and not 0 <= ignore_index < c:
        fast = _hard_label_ce_probe(z, a, t, weight, bias, path)
        if fast is not None:  # None: an ignored or out-of-range label, which the general path handles
            return fast
    ignored = None
    if loss == "ce" and t.dim() == 1:
        ignored = t == ignore_index
        n_ignored = int(ignored.sum())
        labelled = t[~ignored] if n_ignored else t
        if labelled.numel():
            lo, hi = torch.aminmax(labelled)
            if lo == hi:
                warnings.append(single_class_warning(int(lo)))
        if not n_ignored:
            ignored = None
    logp = torch.log_softmax(a, 1) if loss == "ce" else None
    if logp is not None:
        r, value = ce_residual(logp, t, label_smoothing, ignore_index)
    else:
        r, value = residual(a, t, loss=loss, label_smoothing=label_smoothing, ignore_index=ignore_index)
    keep = None
    if ignored is not None:
        keep = ~ignored
    elif loss in REGRESSION_LOSSES and torch.isnan(t).any():
        keep = ~torch.isnan(t).all(1)  # locations without any target (no object there) are not samples
    rz, zz = (r[keep], z[keep]) if keep is not None else (r, z)
    n_used = int(rz.shape[0])
    norm_sq, used_path = weight_grad_norm_sq(rz, zz, path)
    zero = norm_sq.new_zeros(())
    reads = readout_tensor(a, loss, logp)
    # Every statistic leaves the device in one copy: this runs at every step in piggyback mode.
    sums = torch.stack([
        norm_sq.clamp_min(0),
        weight.detach().to(a.dtype).square().sum(),
        zz.square().sum() / n_used if n_used else zero,
        r.sum(0).square().sum() if bias is not None else zero,
        value.detach().to(a.dtype),
    ])
    norm_sq_v, weight_sq, feature_ms, bias_sq, loss_value, entropy, confidence, margin = torch.cat([sums, reads]).tolist()
    # Non-finite logits make the softmax statistics NaN, so the full check only runs when one is (or
    # when there are none, for regression heads).
    suspect = loss in REGRESSION_LOSSES or not math.isfinite(norm_sq_v + loss_value + entropy)
    if suspect and not bool(torch.isfinite(a).all()):
        raise ValfreeError(NON_FINITE_LOGITS)
    grad_norm, weight_norm, feature_rms = math.sqrt(norm_sq_v), math.sqrt(weight_sq), math.sqrt(feature_ms)
    return HeadGradient.from_norms(
        grad_norm,
        weight_norm,
        feature_rms,
        bias_grad_norm=math.sqrt(bias_sq),
        loss=loss_value,
        batch_size=n_used,
        path=used_path,
        warnings=warnings,
        entropy=entropy,
        confidence=confidence,
        margin=margin,
    )


def _hard_label_ce_probe(
    z: torch.Tensor, a: torch.Tensor, t: torch.Tensor, weight: torch.Tensor, bias, path: str
) -> HeadGradient | None:
    """:func:`head_gradient_from_features` for mean cross-entropy on hard labels, unsmoothed; None if
    a label lies outside [0, C).

    The same quantities as the general path from as few distinct tensor kernels as possible, and one
    device-to-host copy. Piggyback mode runs this right after a backward pass has evicted the caches,
    where the first call of each kernel costs tens of microseconds and a repeated call almost nothing,
    so every sum is a ``dot``. With S = N R = softmax(A) - Y (one scatter), grad_W = S^T Z / N,
    grad_b = 1^T S / N, sum_n log p_n[t_n] = <P, log P> - <S, log P>, and the class counts are
    1^T P - 1^T S (a one-class batch is confirmed on the labels themselves); the normalisation by N
    is done in Python.
    """
    n, c = a.shape
    if a.device.type != "cpu":  # the CPU scatter checks its indices itself, and raises
        lo, hi = torch.stack(torch.aminmax(t)).tolist()
        if lo < 0 or hi >= c:
            return None
    logp = torch.log_softmax(a, 1)
    p = logp.exp()
    try:
        s = p.scatter(1, t.unsqueeze(1), -1.0, reduce="add")
    except RuntimeError:  # CPU only: a label outside [0, C)
        return None
    norm_sq, path = weight_grad_norm_sq(s, z, path)
    w = detached(weight).reshape(-1)
    w = w if w.dtype == a.dtype else w.to(a.dtype)
    zf, pf, lf = z.reshape(-1), p.reshape(-1), logp.reshape(-1)
    class_mass, s_sum = p.sum(0), s.sum(0)
    top1, top2 = p.topk(2, 1).values.sum(0).unbind()
    scalars = torch.stack([
        norm_sq, torch.dot(w, w), torch.dot(zf, zf), torch.dot(s_sum, s_sum), torch.dot(pf, lf),
        torch.dot(s.reshape(-1), lf), top1, top2,
    ])
    values = torch.cat([scalars, class_mass, s_sum]).tolist()
    norm_sq_v, weight_sq, z_sq, bias_sq, neg_entropy, s_logp, top1, top2 = values[:8]
    log_lik = neg_entropy - s_logp
    if not math.isfinite(norm_sq_v + log_lik + neg_entropy) and not bool(torch.isfinite(a).all()):
        raise ValfreeError(NON_FINITE_LOGITS)
    counts = [m - d for m, d in zip(values[8: 8 + c], values[8 + c:])]
    warnings = []
    if max(counts) > n - 0.5 - 1e-5 * n:  # (nearly) every label in one class; rounding grows with N, so confirm
        lo, hi = torch.stack(torch.aminmax(t)).tolist()
        if lo == hi:
            warnings.append(single_class_warning(lo))
    grad_norm, weight_norm, feature_rms = math.sqrt(max(norm_sq_v, 0.0)) / n, math.sqrt(weight_sq), math.sqrt(z_sq / n)
    return HeadGradient.from_norms(
        grad_norm,
        weight_norm,
        feature_rms,
        bias_grad_norm=math.sqrt(bias_sq) / n if bias is not None else 0.0,
        loss=-log_lik / n,
        batch_size=n,
        path=path,
        warnings=warnings,
        entropy=-neg_entropy / n,
        confidence=top1 / n,
        margin=(top1 - top2) / n,
    )


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
    options = ProbeOptions(head=head, loss=loss, label_smoothing=label_smoothing, ignore_index=ignore_index, path=path)
    return probe_model(model, inputs, targets, options, train_mode)


def probe_model(model: nn.Module, inputs, targets, options: ProbeOptions, train_mode: bool = False) -> HeadGradient:
    """:func:`head_gradient` with its options as one :class:`ProbeOptions`."""
    found: Head = find_head(model, options.head, inputs)
    (cap,) = capture_forward(model, inputs, [found], train_mode)
    return probe_features(cap.features, cap.logits, targets, found.weight, found.bias, options)
