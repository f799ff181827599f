"""A score series -> a choice; and evaluation-only statistics that never choose."""

import importlib

from .early_stopping import EarlyStopping
from .select import MODES, UNIVERSAL_PRESET, Selection, select_checkpoint, tail_window
from .smoothing import ema, ema_step

__all__ = [
    "Correlations",
    "EarlyStopping",
    "MODES",
    "Selection",
    "UNIVERSAL_PRESET",
    "correlations",
    "ema",
    "ema_step",
    "gap_to_oracle",
    "select_checkpoint",
    "tail_window",
]

# The evaluation statistics need scipy, which takes seconds to import: load them on first use, so that
# the CLI can build its parsers (which read the selection rules) without it.
_EVALUATION = ("Correlations", "correlations", "gap_to_oracle")


def __getattr__(name: str):
    if name in _EVALUATION:
        value = getattr(importlib.import_module(".evaluation", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
