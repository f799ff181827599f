"""Deprecated: scoring a folder is a command, :mod:`valfree.commands.score`, not reading or writing.

This alias keeps scripts that import ``valfree.io.scoring`` running (the evidence benchmark's
``perf.py`` does). It imports nothing at load time: each old name is looked up in its new home on
first use, with a DeprecationWarning. Remove it once no caller uses the old path.
"""

from __future__ import annotations

import importlib
import warnings

# old name -> (new module, name there)
_MOVED = {
    "score_checkpoints": ("valfree.commands.score", "score_checkpoints"),
    "ScoreSummary": ("valfree.commands.checkpoint_loop", "RunSummary"),
    "probe_row": ("valfree.io.results", "probe_row"),
    "build_hf_model": ("valfree.io.hf_model", "build_hf_model"),
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module 'valfree.io.scoring' has no attribute {name!r}")
    module, new_name = _MOVED[name]
    warnings.warn(f"valfree.io.scoring.{name} moved to {module}.{new_name}", DeprecationWarning, stacklevel=2)
    return getattr(importlib.import_module(module), new_name)
