"""The baseline criteria Torch-Pruning lacks or gets wrong: WHC, and fixed Taylor and Hessian importances.

Everything Torch-Pruning does correctly (L1 magnitude, BN scale, FPGM, random) is used from it as is;
see :mod:`valfree.pruning.criteria`. Here:

* :class:`WHCImportance`: the weighted hybrid criterion (Chen et al., ICASSP 2023), which Torch-Pruning
  does not ship: score_i = ||w_i|| * sum_j ||w_j|| (1 - |cos(w_i, w_j)|), small for filters that are
  weak *and* redundant with the others.
* :class:`TaylorImportance`: Torch-Pruning's first-order Taylor criterion |w * dL/dw| with the
  labelled loss. Its BatchNorm branch tests for the GroupNorm pruning function, so BatchNorm scales
  never contribute (torch-pruning 1.6); the missing BatchNorm term is added here.
* :class:`HessianImportance`: Torch-Pruning's group OBD criterion w^2 * E[g^2] with the labelled loss.
  Its gradient accumulator looks parameters up by *name* in a dict keyed by the *parameter*, so every
  call overwrites the sum and resets the count: it keeps the last sample's squared gradient instead of
  the mean (torch-pruning 1.6). The accumulator is fixed here, and the per-sample gradients come from
  one vectorised ``torch.func`` pass per batch instead of a backward per sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.func import functional_call, grad, vmap
from torch_pruning.pruner import function

from ..batches import batch_size_of, call_args, forward, map_tensors
from .calibration import Calibration
from .importance import CalibratedImportance, as_logits


class WHCImportance(tp.importance.GroupMagnitudeImportance):
    """Weighted hybrid criterion: filter norm times its norm-weighted dissimilarity to the other filters.

    Conv and linear layers are scored on their output filters and on their input slices, as
    Torch-Pruning's FPGM does; normalisation layers carry no filter and are skipped.
    """

    def __init__(self, group_reduction: str = "mean", normalizer: str | None = "mean"):
        super().__init__(p=2, group_reduction=group_reduction, normalizer=normalizer, bias=False,
                         target_types=[nn.modules.conv._ConvNd, nn.Linear])

    @staticmethod
    def whc_scores(filters: torch.Tensor) -> torch.Tensor:
        """score_i = ||f_i|| sum_j ||f_j|| (1 - |cos(f_i, f_j)|) for the rows f_i of ``filters``."""
        norms = filters.norm(dim=1)
        unit = F.normalize(filters, dim=1)
        dissimilarity = 1.0 - (unit @ unit.T).abs()
        return norms * (dissimilarity @ norms)

    @torch.no_grad()
    def __call__(self, group):
        group_imp, group_idxs = [], []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if not isinstance(layer, tuple(self.target_types)):
                continue
            transposed = getattr(layer, "transposed", False)
            w = layer.weight.detach()
            if dep.handler in (function.prune_conv_out_channels, function.prune_linear_out_channels):
                rows = (w.transpose(0, 1) if transposed else w).flatten(1)
                local = self.whc_scores(rows.float())[list(idxs)]
            elif dep.handler in (function.prune_conv_in_channels, function.prune_linear_in_channels):
                rows = (w if transposed else w.transpose(0, 1)).flatten(1)
                local = self.whc_scores(rows.float())
                groups = getattr(layer, "groups", 1)
                if isinstance(layer, nn.modules.conv._ConvNd) and groups > 1:
                    local = local.repeat(groups)
                local = local[list(idxs)]
            else:
                continue
            group_imp.append(local)
            group_idxs.append(group[i].root_idxs)
        if not group_imp:
            return None
        return self._normalize(self._reduce(group_imp, group_idxs), self.normalizer)


class TaylorImportance(tp.importance.GroupTaylorImportance, CalibratedImportance):
    """Torch-Pruning's group Taylor importance on the labelled loss, with BatchNorm scales counted.

    :meth:`update` accumulates the gradient of the mean cross-entropy over the calibration batches
    (model in eval mode) into ``.grad``, which Torch-Pruning's scorer reads; Torch-Pruning slices
    ``.grad`` together with the weights when it prunes, so the scores stay aligned between steps.
    """

    requires_labels = True

    def __init__(self, group_reduction: str = "mean", normalizer: str | None = "mean", multivariable: bool = False):
        super().__init__(group_reduction=group_reduction, normalizer=normalizer, multivariable=multivariable)
        self._batchnorm_terms: list[tuple[torch.Tensor, list]] = []

    def update(self, model: nn.Module, calibration: Calibration) -> None:
        was_training = model.training
        model.eval()
        model.zero_grad(set_to_none=True)
        try:
            for x, y in zip(calibration.inputs, calibration.labels):
                F.cross_entropy(as_logits(forward(model, x)), y).backward()
        finally:
            model.train(was_training)

    @torch.no_grad()
    def __call__(self, group):
        # Workaround: Torch-Pruning 1.6 checks prune_groupnorm_out_channels in its BatchNorm branch, so
        # BatchNorm layers are never scored. Collect their |gamma * dL/dgamma| here and merge them in
        # _reduce, which the parent calls with its own terms.
        self._batchnorm_terms = []
        for i, (dep, idxs) in enumerate(group):
            layer = dep.target.module
            if dep.handler == function.prune_batchnorm_out_channels and layer.affine and layer.weight.grad is not None:
                idx = list(idxs)
                local = (layer.weight.detach()[idx] * layer.weight.grad[idx]).abs()
                if self.bias and layer.bias is not None and layer.bias.grad is not None:
                    shift = (layer.bias.detach()[idx] * layer.bias.grad[idx]).abs()
                    self._batchnorm_terms.append((shift, group[i].root_idxs))
                self._batchnorm_terms.append((local, group[i].root_idxs))
        try:
            return super().__call__(group)
        finally:
            self._batchnorm_terms = []

    def _reduce(self, group_imp, group_idxs):
        for local, root_idxs in self._batchnorm_terms:
            group_imp.append(local)
            group_idxs.append(root_idxs)
        return super()._reduce(group_imp, group_idxs)


class HessianImportance(tp.importance.GroupHessianImportance, CalibratedImportance):
    """Torch-Pruning's group Hessian (OBD) importance, w^2 * E_n[g_n^2], with a working accumulator.

    The expectation is over per-sample gradients g_n of the labelled cross-entropy (eval mode).
    """

    requires_labels = True

    def accumulate_grad(self, model: nn.Module) -> None:
        """Add the squared ``.grad`` of every parameter as one more sample (the upstream API, fixed).

        Workaround: upstream keys its dicts by parameter but tests membership by name, so each call
        replaced the running sum and reset the count; here both are keyed by the parameter.
        """
        for param in model.parameters():
            if param.grad is not None:
                self.accumulate_squared(param, param.grad.detach().pow(2), 1)

    def accumulate_squared(self, param: torch.Tensor, sum_of_squares: torch.Tensor, count: int) -> None:
        if param in self._accu_grad:
            self._accu_grad[param] += sum_of_squares
            self._counter[param] += count
        else:
            self._accu_grad[param] = sum_of_squares.clone()
            self._counter[param] = count

    def update(self, model: nn.Module, calibration: Calibration) -> None:
        self.zero_grad()
        was_training = model.training
        model.eval()
        names = [n for n, p in model.named_parameters() if p.requires_grad]
        params = dict(model.named_parameters())
        buffers = dict(model.named_buffers())

        def sample_loss(weights, x, y):
            args, kwargs = call_args(model, map_tensors(lambda t: t.unsqueeze(0), x))
            out = functional_call(model, (weights, buffers), args, kwargs)  # frozen weights: the module's own
            return F.cross_entropy(as_logits(out), y.unsqueeze(0))

        per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
        try:
            weights = {n: params[n].detach() for n in names}
            for x, y in zip(calibration.inputs, calibration.labels):
                grads = per_sample_grad(weights, x, y)
                for n in names:
                    self.accumulate_squared(params[n], grads[n].pow(2).sum(0), batch_size_of(x))
        finally:
            model.train(was_training)
        # Torch-Pruning's scorer moves the mean into .grad on its first call, so .grad must exist.
        for n in names:
            if params[n].grad is None:
                params[n].grad = torch.zeros_like(params[n])
