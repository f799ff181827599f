"""JBR and the labelled Jacobian criterion as Torch-Pruning importances.

Both score a channel by the first-order change of a cross-entropy loss when the channel is removed,
accumulated over calibration batches. They differ only in the targets of that loss:

* :class:`JBRImportance` uses pseudo-labels ``y* = argmax f_w0(x)`` of the *unpruned* model, kept only
  where its max probability exceeds ``confidence`` (default 0.9). No true label is read.
* :class:`JacobianImportance` uses the true labels (the Jacobian criterion of Chen et al., 2025,
  "Optimal Brain Connection"), on every sample.

The maths. Let L_b(w) be the mean cross-entropy of batch b against its targets. Removing a channel c
sets the parameters S_c of that channel to zero, dw = -w on S_c, so to first order

    dL_b(c) = -sum_{p in S_c} g_{b,p} w_p,      g_b = grad_w L_b

and the score is the sum of squares over the N calibration batches,

    score(c) = sum_b ( sum_{p in S_c} g_{b,p} w_p )^2 .

The square is taken per batch, on the batch-mean loss, as in the Jacobian criterion's reference
implementation: every row of its Jacobian J is one batch gradient and the score is w^T J^T J w. In
eval mode (used here, so BatchNorm uses running statistics and samples do not interact) the batch
gradient is the mean of per-sample gradients, so with per-sample changes d_n,

    E[(dL_b)^2] = (E d)^2 + Var(d) / B

i.e. the per-batch square weighs the mean loss change fully and the per-sample spread by 1/B. With
``batch_size=1`` the same code gives the per-sample form sum_n d_n^2, which is TPV along the
pseudo-label direction (E_x (delta_u^T J(x) dw)^2); larger batches move the score towards the squared
change of the mean loss, which is what accuracy after pruning depends on.

Group awareness. Torch-Pruning removes a channel from every layer of its dependency group at once
(a conv's output, the BatchNorm after it, the next conv's input). S_c is taken per layer and per role
(output or input channel) and the per-layer scores are combined with Torch-Pruning's own
``group_reduction`` and ``normalizer``, exactly as its magnitude and Taylor importances do.

Memory. Each batch's gradient is reduced to one number per channel before the next batch, so the
state is one vector per (layer, role): O(channels), independent of N and of the parameter count.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch_pruning.pruner import function

from ..batches import batch_size_of, concat, forward, logits_of, take
from ..errors import ValfreeError
from .calibration import Calibration

# Torch-Pruning's pruning functions, by the role the pruned channel plays in the layer.
OUT_CHANNEL_FNS = (
    function.prune_conv_out_channels,
    function.prune_linear_out_channels,
    function.prune_depthwise_conv_out_channels,
    function.prune_batchnorm_out_channels,
    function.prune_layernorm_out_channels,
)
IN_CHANNEL_FNS = (function.prune_conv_in_channels, function.prune_linear_in_channels)
NORM_TYPES = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
DEFAULT_TARGET_TYPES = (nn.modules.conv._ConvNd, nn.Linear, *NORM_TYPES)


class CalibratedImportance:
    """Mixin for importances that need a pass over calibration data before each pruning step.

    The pruning runner calls :meth:`prepare` once on the unpruned model and :meth:`update` before every
    step; after each pruned group it calls :meth:`forget` so that stored per-channel state follows the
    pruned shapes. Importances that read true labels set ``requires_labels = True``; the runner then
    loads labels with the calibration data, and only then.
    """

    requires_labels = False

    def prepare(self, model: nn.Module, calibration: Calibration) -> None:
        """Called once, before any pruning, with the unpruned model."""

    def update(self, model: nn.Module, calibration: Calibration) -> None:
        """Called before each pruning step with the current model."""

    def forget(self, group) -> None:
        """Called after ``group`` was pruned; drop the state of the removed channels."""


def channel_role(handler) -> str | None:
    """'out' or 'in' for Torch-Pruning's conv/linear/norm pruning functions, None for any other."""
    if handler in OUT_CHANNEL_FNS:
        return "out"
    if handler in IN_CHANNEL_FNS:
        return "in"
    return None


def channel_weight_gradient_sums(layer: nn.Module, grads: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel sum of g * w over the channel's parameters in ``layer``, by role.

    ``grads`` maps 'weight' (and 'bias') to the gradients of the layer's parameters. The 'out' entry of
    a conv or linear layer covers its output slice and bias; the 'in' entry covers its input slice (bias
    is not part of an input channel). A norm layer's channel is its scale and shift. Grouped
    convolutions follow Torch-Pruning's convention: the per-group input score is repeated ``groups``
    times.
    """
    w = layer.weight.detach()
    gw = grads["weight"] * w
    b = getattr(layer, "bias", None)
    gb = grads["bias"] * b.detach() if b is not None and "bias" in grads else None
    if isinstance(layer, NORM_TYPES):
        out = gw.reshape(-1) if gb is None else (gw + gb).reshape(-1)
        return {"out": out}
    transposed = getattr(layer, "transposed", False)
    per_out = gw.transpose(0, 1) if transposed else gw
    out = per_out.flatten(1).sum(1)
    if gb is not None:
        out = out + gb
    sums = {"out": out}
    depthwise = isinstance(layer, nn.modules.conv._ConvNd) and layer.groups == layer.in_channels == layer.out_channels
    if not depthwise:  # a depthwise conv's input channel is its output channel, scored once
        per_in = gw if transposed else gw.transpose(0, 1)
        inp = per_in.flatten(1).sum(1)
        groups = getattr(layer, "groups", 1)
        if isinstance(layer, nn.modules.conv._ConvNd) and groups > 1:
            inp = inp.repeat(groups)
        sums["in"] = inp
    return sums


class AccumulatedJacobianImportance(tp.importance.GroupMagnitudeImportance, CalibratedImportance):
    """Shared machinery of JBR and the Jacobian criterion: sum over batches of squared g.w per channel.

    Subclasses choose the calibration batches and their targets in :meth:`batches`.
    """

    def __init__(self, group_reduction: str = "mean", normalizer: str | None = "mean",
                 target_types: Sequence[type] = DEFAULT_TARGET_TYPES):
        super().__init__(p=2, group_reduction=group_reduction, normalizer=normalizer, bias=False,
                         target_types=list(target_types))
        self.scores: dict[tuple[nn.Module, str], torch.Tensor] = {}
        self.num_batches = 0

    # -- data -------------------------------------------------------------------------------------
    def batches(self, calibration: Calibration) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    # -- accumulation -----------------------------------------------------------------------------
    def reset(self) -> None:
        self.scores = {}
        self.num_batches = 0

    def update(self, model: nn.Module, calibration: Calibration) -> None:
        """Recompute the scores of the current model over all calibration batches."""
        self.reset()
        layers = [m for m in model.modules() if isinstance(m, tuple(self.target_types)) and _has_trainable_weight(m)]
        params, owners = [], []
        for layer in layers:
            for name in ("weight", "bias"):
                p = getattr(layer, name, None)
                if isinstance(p, torch.Tensor) and p.requires_grad:
                    params.append(p)
                    owners.append((layer, name))
        if not params:
            return  # every layer is frozen: nothing to score
        was_training = model.training
        model.eval()  # running BatchNorm statistics: samples do not interact, see the module docstring
        try:
            for inputs, targets in self.batches(calibration):
                loss = F.cross_entropy(as_logits(forward(model, inputs)), targets)
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                by_layer: dict[nn.Module, dict[str, torch.Tensor]] = {}
                for (layer, name), g in zip(owners, grads):
                    if g is not None:
                        by_layer.setdefault(layer, {})[name] = g
                for layer, layer_grads in by_layer.items():
                    if "weight" not in layer_grads:
                        continue
                    for role, s in channel_weight_gradient_sums(layer, layer_grads).items():
                        key = (layer, role)
                        sq = s.detach().pow(2)
                        self.scores[key] = self.scores[key] + sq if key in self.scores else sq
                self.num_batches += 1
        finally:
            model.train(was_training)

    def forget(self, group) -> None:
        for dep, idxs in group:
            role = channel_role(dep.handler)
            key = (dep.target.module, role)
            if role is None or key not in self.scores or not idxs:
                continue
            keep = torch.ones(len(self.scores[key]), dtype=torch.bool, device=self.scores[key].device)
            keep[torch.as_tensor(sorted(set(idxs)), device=keep.device)] = False
            self.scores[key] = self.scores[key][keep]

    # -- Torch-Pruning interface -------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, group) -> torch.Tensor | None:
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if not isinstance(layer, tuple(self.target_types)):
                continue
            role = channel_role(dep.handler)
            score = self.scores.get((layer, role))
            if score is None:
                continue
            group_imp.append(score[list(idxs)])
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


class JBRImportance(AccumulatedJacobianImportance):
    """JBR: the label-free Jacobian criterion on the unpruned model's confident pseudo-labels.

    :meth:`prepare` runs the unpruned model once over the calibration inputs, keeps the samples whose
    max softmax probability exceeds ``confidence`` and stores ``y* = argmax``. Those samples and
    targets stay fixed for every later pruning step; the kept samples are regrouped into batches of
    ``calibration.batch_size``. See the module docstring for the score.
    """

    requires_labels = False

    def __init__(self, confidence: float = 0.9, group_reduction: str = "mean", normalizer: str | None = "mean",
                 target_types: Sequence[type] = DEFAULT_TARGET_TYPES):
        if not 0.0 <= confidence < 1.0:
            raise ValfreeError(f"confidence must be in [0, 1), not {confidence}; 0.9 is the usual threshold.")
        super().__init__(group_reduction, normalizer, target_types)
        self.confidence = confidence
        self.pseudo_batches: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.kept_fraction: float | None = None

    @torch.no_grad()
    def prepare(self, model: nn.Module, calibration: Calibration) -> None:
        was_training = model.training
        model.eval()
        kept_x, kept_y, total, best = [], [], 0, 0.0
        try:
            for x in calibration.inputs:
                prob = torch.softmax(as_logits(forward(model, x)).float(), dim=1)
                top, label = prob.max(dim=1)
                keep = top > self.confidence
                kept_x.append(take(x, keep))
                kept_y.append(label[keep])
                total += batch_size_of(x)
                best = max(best, float(top.max()))
        finally:
            model.train(was_training)
        x_all, y_all = concat(kept_x), torch.cat(kept_y)
        if len(y_all) == 0:
            raise ValfreeError(
                f"no calibration sample has a max probability above confidence={self.confidence} "
                f"(the highest of {total} is {best:.3f}); lower the threshold, e.g. confidence={_suggest(best)} "
                "(on the command line --confidence), or check that the checkpoint is trained."
            )
        self.kept_fraction = len(y_all) / total
        size = calibration.batch_size
        self.pseudo_batches = [(take(x_all, slice(i, i + size)), y_all[i:i + size]) for i in range(0, len(y_all), size)]

    def batches(self, calibration: Calibration):
        if self.pseudo_batches is None:
            raise RuntimeError("JBRImportance.prepare(model, calibration) must run on the unpruned model first.")
        return self.pseudo_batches


class JacobianImportance(AccumulatedJacobianImportance):
    """The labelled Jacobian criterion: JBR's score with the true labels, on every sample."""

    requires_labels = True

    def batches(self, calibration: Calibration):
        return zip(calibration.inputs, calibration.labels)


def _has_trainable_weight(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.requires_grad


def as_logits(output) -> torch.Tensor:
    """The logits of the model's output (itself, or the ``logits`` of a Hugging Face output or dict, see
    :func:`valfree.batches.logits_of`) if they are a (batch, classes) tensor; a ValfreeError otherwise."""
    logits = logits_of(output)
    if isinstance(logits, torch.Tensor) and logits.dim() == 2:
        return logits
    shape = tuple(output.shape) if isinstance(output, torch.Tensor) else type(output).__name__
    raise ValfreeError(
        f"the model returned {shape} where logits of shape (batch, classes) are needed (by the data-driven "
        "criteria, fine-tuning and accuracy); wrap the model so that forward() returns the classification logits."
    )


def _suggest(best: float) -> str:
    return f"{max(0.0, round(best - 0.05, 2)):.2f}"
