"""torch.distributed: the probe of the global batch, rank agreement, and `valfree score` under torchrun.

Under data parallelism each rank holds a slice of the batch. The probe must measure the gradient of
the *global* batch, which is not the mean of per-rank norms:

    grad_W = sum_r R_r^T Z_r,   with every R_r normalised by the global count of samples.

Two exchanges give it exactly. Each rank can all-reduce its C x d matrix R_r^T Z_r (plus a few
sample-weighted sums for the loss and the readouts), or all ranks can gather the head's inputs and
outputs and compute the probe of the union. The first moves C*d numbers, the second N*(C+d); the
cheaper one is used, the same rule as the Gram/direct choice of the single-process probe. The first is
exact only for a loss that is a mean over rows (ce, bce, a callable mean), so focal and the regression
losses always gather. Both paths prepare rows and targets with :mod:`valfree.probes.rows`, as the
single-process probe does.

Every function here falls back to the single-process probe when torch.distributed is not
initialised, so callers need no special case. Splitting ``valfree score`` over torchrun ranks is in
:mod:`valfree.commands.score_torchrun`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ValfreeError
from ..probes import HeadGradient, ProbeOptions, capture_forward, find_head, probe_features, residual
from ..probes.head_gradient import single_class_warning
from ..probes.readouts import READOUTS
from ..probes.rows import NON_FINITE_LOGITS, PSEUDO, probe_rows, probe_targets, pseudo_targets, readout_tensor

# ----- process group ----------------------------------------------------------------------------------


def is_distributed(group=None) -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def rank_and_world(group=None) -> tuple[int, int]:
    if is_distributed(group):
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel (or DataParallel): probing it avoids DDP's own collectives."""
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def agree_any(flag: bool, group=None, device: torch.device | str = "cpu") -> bool:
    """True on every rank if it is True on any rank: a stop decision that no rank can miss."""
    if not is_distributed(group):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0], device=collective_device(device, group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item() > 0)


def broadcast_object(obj, src: int = 0, group=None):
    """Rank ``src``'s ``obj`` on every rank (picklable objects; a no-op without a process group)."""
    if not is_distributed(group):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def collective_device(device, group=None) -> torch.device:
    # NCCL only moves CUDA tensors; gloo moves both.
    device = torch.device(device)
    if dist.get_backend(group) == "nccl" and device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def shard_batch(batch, rank: int, world: int):
    """Rank ``rank``'s share of a batch: every ``world``-th sample, for tensors, tuples, lists and dicts.

    Strided slices keep every rank's share within one sample of the others, and concatenating the
    shares in rank order is a permutation of the batch, which the probe does not depend on.
    """
    if world == 1 or batch is None or isinstance(batch, str):
        return batch
    if isinstance(batch, torch.Tensor):
        return batch[rank::world] if batch.dim() > 0 else batch
    if isinstance(batch, dict):
        return {k: shard_batch(v, rank, world) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard_batch(v, rank, world) for v in batch)
    return batch


# ----- the probe of the global batch ------------------------------------------------------------------


@dataclass
class _LocalTerms:
    """One rank's share of the probe, before any exchange."""

    z: torch.Tensor          # (n, d) features, one row per sample or location
    a: torch.Tensor          # (n, C) logits
    t: torch.Tensor | None   # (n,) class indices or (n, C) soft/multi-hot targets; None for pseudo-labels
    n_norm: int              # the count the local mean loss divides by (non-ignored rows for hard CE)
    ignored: bool            # some row carries ignore_index
    error: str | None
    r: torch.Tensor | None = None   # dL/dA of this rank's mean loss
    loss: float = 0.0               # this rank's mean loss


def _local_terms(features, logits, targets, weight, options: ProbeOptions) -> _LocalTerms:
    """Validate and compute this rank's share. Errors are returned, not raised, so that every rank
    can learn of them in the first exchange instead of the healthy ranks hanging in a collective."""
    loss = options.loss
    z, a = probe_rows(features, logits, weight)
    terms = _LocalTerms(z, a, None, a.shape[0], False, None)
    if not torch.isfinite(a).all():
        terms.error = NON_FINITE_LOGITS
        return terms
    try:
        t = probe_targets(targets, a, logits, weight, loss)
    except ValfreeError as exc:
        terms.error = str(exc)
        return terms
    if not (targets is None or isinstance(targets, str)):
        terms.t = t
    if loss == "ce" and t.dim() == 1:
        valid = t != options.ignore_index
        terms.n_norm, terms.ignored = int(valid.sum()), bool((~valid).any())
    terms.r = torch.zeros_like(a)
    if a.shape[0] and terms.n_norm:
        try:
            terms.r, value = residual(a, t, loss=loss, label_smoothing=options.label_smoothing,
                                      ignore_index=options.ignore_index)
            terms.loss = float(value)
        except ValfreeError as exc:
            terms.error = str(exc)
    return terms


def _mean_over_rows(loss) -> bool:
    """Whether the loss is a mean over rows, so that each rank's residual rescaled by its share of the
    rows is the global one. Focal divides by the count of positives, and MSE/L1 by the count of
    non-NaN targets, which differ from rank to rank: for those the union is gathered instead."""
    return loss in ("ce", "bce") or callable(loss)


def distributed_head_gradient_from_features(
    features: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor | str | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    loss="ce",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    path: str = "auto",
    group=None,
) -> HeadGradient:
    """:func:`valfree.head_gradient_from_features` over the union of every rank's batch.

    Each rank passes its own slice (any size, even empty); every rank receives the same result, equal
    to the single-process probe on the concatenated batch. A callable ``loss`` must be a mean over
    samples, as the built-in losses are. Must be called by every rank of ``group`` (a collective).
    Without an initialised process group this is exactly ``head_gradient_from_features``.
    """
    options = ProbeOptions(loss=loss, label_smoothing=label_smoothing, ignore_index=ignore_index, path=path)
    return distributed_probe_features(features, logits, targets, weight, bias, options, group)


def distributed_probe_features(features, logits, targets, weight, bias, options: ProbeOptions, group=None) -> HeadGradient:
    """:func:`distributed_head_gradient_from_features` with its options as one :class:`ProbeOptions`."""
    if not is_distributed(group):
        return probe_features(features, logits, targets, weight, bias, options)
    terms = _local_terms(features, logits, targets, weight, options)
    rank, world = rank_and_world(group)
    device = collective_device(terms.a.device, group)
    # First exchange: sizes and flags, so that every rank takes the same path and the same normaliser.
    mine = torch.tensor([terms.a.shape[0], terms.n_norm, int(terms.ignored), int(terms.error is not None)],
                        dtype=torch.float64, device=device)
    table = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(table, mine, group=group)
    table = torch.stack(table).cpu()
    failed = [r for r in range(world) if table[r, 3] > 0]
    if failed:
        raise ValfreeError(terms.error or f"rank {failed[0]} could not compute the probe (see its error); no rank scored this batch.")
    rows = [int(n) for n in table[:, 0]]
    n_classes, dim = terms.a.shape[1], terms.z.shape[1]
    if sum(rows) == 0:
        raise ValfreeError("the probe batch is empty on every rank, so there is nothing to probe.")
    if table[:, 1].sum() == 0:
        raise ValfreeError("every target in the probe batch equals ignore_index, so there is nothing to probe.")
    cheaper_to_gather = world * max(rows) * (n_classes + dim + 1) < n_classes * dim
    if cheaper_to_gather or not _mean_over_rows(options.loss):
        return _gathered(terms, weight, bias, rows, options, group, device)
    return _reduced(terms, weight, bias, int(table[:, 1].sum()), bool(table[:, 2].sum() > 0), options, group, device)


def _gathered(terms, weight, bias, rows, options: ProbeOptions, group, device) -> HeadGradient:
    """Gather the head's inputs, outputs and targets, then probe the union: cheaper when N(C+d) < Cd, and
    exact for every loss, including those that are not a mean over rows."""
    n_max = max(rows)
    z, a, t = terms.z, terms.a, terms.t
    t_cols = 0 if t is None else (1 if t.dim() == 1 else t.shape[1])
    parts = [z, a] + ([] if t is None else [t.reshape(len(t), -1).to(z.dtype)])
    packed = torch.cat(parts, 1)
    padded = torch.zeros(n_max, packed.shape[1], dtype=packed.dtype, device=device)
    padded[: len(packed)] = packed.to(device)
    gathered = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(gathered, padded, group=group)
    union = torch.cat([g[:n] for g, n in zip(gathered, rows)]).to(z.device)
    d, c = z.shape[1], a.shape[1]
    z_all, a_all = union[:, :d], union[:, d: d + c]
    if t is None:
        t_all = PSEUDO
    elif t.dim() == 1:
        t_all = union[:, d + c].round().long()  # class indices (and ignore_index) are exact in float
    else:
        t_all = union[:, d + c: d + c + t_cols]
    result = probe_features(z_all, a_all, t_all, weight.reshape(weight.shape[0], -1), bias, options)
    result.path = f"all_gather+{result.path}"
    return result


def _reduced(terms, weight, bias, n_norm_total, any_ignored, options: ProbeOptions, group, device) -> HeadGradient:
    """All-reduce R_r^T Z_r and sample-weighted sums: cheaper when C*d <= N(C+d)."""
    loss, ignore_index = options.loss, options.ignore_index
    z, a = terms.z, terms.a
    n, c = a.shape
    t = terms.t if terms.t is not None else pseudo_targets(a, loss)
    hard_ce = loss == "ce" and t.dim() == 1
    # residual() divided by this rank's count; the global mean divides by everyone's.
    r = terms.r * (terms.n_norm / n_norm_total)
    loss_sum = terms.loss * terms.n_norm
    # The single-process probe drops ignored rows from the Gram/feature statistics: same rule, global flag.
    keep = r.abs().sum(1) > 0 if hard_ce and any_ignored else torch.ones(n, dtype=torch.bool, device=a.device)
    rz, zz = r[keep], z[keep]
    reads = dict(zip(READOUTS, readout_tensor(a, loss).tolist())) if n else dict.fromkeys(READOUTS, 0.0)
    present = torch.zeros(c, dtype=a.dtype, device=a.device)
    if hard_ce and n:
        labels = t[t != ignore_index]
        present = torch.bincount(labels, minlength=c)[:c].to(a.dtype) if labels.numel() else present
    scalars = torch.tensor(
        [loss_sum, reads["entropy"] * n, reads["confidence"] * n, reads["margin"] * n,
         float(zz.square().sum()), float(keep.sum()), float(n)],
        dtype=a.dtype, device=a.device,
    )
    packet = torch.cat([(rz.T @ zz).flatten(), r.sum(0), present, scalars]).to(device)
    dist.all_reduce(packet, group=group)
    packet = packet.to(a.device)
    g, rest = packet[: c * z.shape[1]], packet[c * z.shape[1]:]
    bias_grad, present, scalars = rest[:c], rest[c: 2 * c], rest[2 * c:]
    loss_total, entropy, confidence, margin, zsq, n_used, n_rows = (float(v) for v in scalars)
    grad_norm = float(g.square().sum().sqrt())
    weight_norm = float(weight.detach().to(a.dtype).norm())
    feature_rms = (zsq / n_used) ** 0.5 if n_used else 0.0
    warnings = []
    if hard_ce and int((present > 0).sum()) == 1:
        cls = int((present > 0).nonzero()[0])
        warnings.append(single_class_warning(cls))
    return HeadGradient.from_norms(
        grad_norm,
        weight_norm,
        feature_rms,
        bias_grad_norm=float(bias_grad.norm()) if bias is not None else 0.0,
        loss=loss_total / n_norm_total,
        entropy=entropy / n_rows,
        confidence=confidence / n_rows,
        margin=margin / n_rows,
        batch_size=int(round(n_used)),
        path="all_reduce",
        warnings=warnings,
    )


def capture_features(model: nn.Module, inputs, head=None, train_mode: bool = False):
    """Run ``model`` once without gradients and return (head, features, logits) as the head saw them."""
    model = unwrap(model)
    found = find_head(model, head)
    (cap,) = capture_forward(model, inputs, [found], train_mode)
    return found, cap.features, cap.logits


def distributed_head_gradient(
    model: nn.Module,
    inputs,
    targets: torch.Tensor | str | None = None,
    head: str | nn.Module | None = None,
    loss="ce",
    label_smoothing: float = 0.0,
    ignore_index: int = -100,
    path: str = "auto",
    train_mode: bool = False,
    group=None,
) -> HeadGradient:
    """:func:`valfree.head_gradient` of the union of every rank's ``inputs`` (each rank passes its share).

    The model is unwrapped from DDP and run locally; only the head's statistics cross ranks. Every
    rank returns the same result. Without a process group this is ``head_gradient``.
    """
    options = ProbeOptions(head=head, loss=loss, label_smoothing=label_smoothing, ignore_index=ignore_index, path=path)
    return distributed_probe_model(model, inputs, targets, options, train_mode, group)


def distributed_probe_model(model: nn.Module, inputs, targets, options: ProbeOptions, train_mode: bool = False,
                            group=None) -> HeadGradient:
    """:func:`distributed_head_gradient` with its options as one :class:`ProbeOptions`."""
    found, features, logits = capture_features(model, inputs, options.head, train_mode)
    return distributed_probe_features(features, logits, targets, found.weight, found.bias, options, group)
