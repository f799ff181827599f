"""valfree: model selection without validation labels.

The head-gradient probe picks checkpoints and stops training early; test prediction variance (TPV)
measures how far predictions move under quantization, pruning, SGD or label noise; JBR prunes channels
without labels. Heavy or optional parts (TPV, pruning, the framework integrations) load on first use.
"""

from __future__ import annotations

import importlib

from .errors import ValfreeError
from .probes import Head, HeadGradient, find_head, head_gradient, head_gradient_from_features
from .selection import EarlyStopping, Selection, correlations, gap_to_oracle, select_checkpoint

__version__ = "0.1.0"

# name -> (module, attribute); attribute None means the module itself.
_LAZY = {
    "tpv": ("valfree.tpv", None),  # the package is callable: valfree.tpv(model, x, noise)
    "tpv_stability": ("valfree.tpv", "tpv_stability"),
    "noise": ("valfree.tpv.noise", None),
    "prune": ("valfree.pruning", "prune"),
    "Monitor": ("valfree.integrations.monitor", "Monitor"),
    "lightning": ("valfree.lightning", None),
    "huggingface": ("valfree.huggingface", None),
}

__all__ = [
    "EarlyStopping",
    "Head",
    "HeadGradient",
    "Selection",
    "ValfreeError",
    "correlations",
    "find_head",
    "gap_to_oracle",
    "head_gradient",
    "head_gradient_from_features",
    "select_checkpoint",
    *_LAZY,
]


def __getattr__(name: str):
    if name in _LAZY:
        module_name, attribute = _LAZY[name]
        module = importlib.import_module(module_name)
        value = module if attribute is None else getattr(module, attribute)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'valfree' has no attribute {name!r}")
