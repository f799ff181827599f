"""Label-free structured pruning: JBR and the baseline criteria as Torch-Pruning importances.

``valfree.prune(model, data, criterion="jbr", ratio=0.5)`` is the one call; :data:`CRITERIA` lists the
criteria; :func:`save_pruned` / :func:`load_pruned` store a pruned model without its factory and
without pickle. Torch-Pruning (the ``pruning`` extra) is imported on first use, and loading a saved
pruned model does not need it at all.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "prune": "runner",
    "prune_with": "runner",
    "PruneOptions": "options",
    "PruneResult": "runner",
    "PruneStep": "runner",
    "recalibrate_batchnorm": "recovery",
    "finetune": "recovery",
    "distillation_loss": "recovery",
    "CRITERIA": "criteria",
    "LABEL_FREE": "criteria",
    "Criterion": "criteria",
    "get_criterion": "criteria",
    "make_importance": "criteria",
    "CalibratedImportance": "importance",
    "JBRImportance": "importance",
    "JacobianImportance": "importance",
    "channel_weight_gradient_sums": "importance",
    "WHCImportance": "baselines",
    "TaylorImportance": "baselines",
    "HessianImportance": "baselines",
    "Calibration": "calibration",
    "calibration_from": "calibration",
    "save_pruned": "saving",
    "load_pruned": "saving",
    "read_pruned_info": "saving",
}
_NEEDS_TORCH_PRUNING = {"runner", "recovery", "criteria", "importance", "baselines"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'valfree.pruning' has no attribute {name!r}")
    module_name = _EXPORTS[name]
    if module_name in _NEEDS_TORCH_PRUNING:
        _require_torch_pruning()
    value = getattr(importlib.import_module(f"{__name__}.{module_name}"), name)
    globals()[name] = value
    return value


def _require_torch_pruning() -> None:
    try:
        import torch_pruning  # noqa: F401
    except ImportError:
        from ..errors import ValfreeError

        raise ValfreeError(
            "pruning needs Torch-Pruning, which is not installed; install it with pip install 'valfree[pruning]'."
        ) from None
