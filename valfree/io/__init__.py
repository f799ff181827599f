"""Reading and writing: checkpoints, data specs, model factories, the results store, reports."""

from .checkpoints import CheckpointRef, discover_checkpoints, file_identity, load_into, load_state_dict, step_from_name
from .data import load_dataset, probe_batch
from .factory import build_model, resolve_callable

__all__ = [
    "CheckpointRef",
    "build_model",
    "discover_checkpoints",
    "file_identity",
    "load_dataset",
    "load_into",
    "load_state_dict",
    "probe_batch",
    "resolve_callable",
    "step_from_name",
]
