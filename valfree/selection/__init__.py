"""A score series -> a choice; and evaluation-only statistics that never choose."""

from .early_stopping import EarlyStopping
from .evaluation import Correlations, correlations, gap_to_oracle
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
