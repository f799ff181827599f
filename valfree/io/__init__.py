"""Reading and writing only: checkpoints, data specs, model factories, the results store, Hugging Face
trainer state and checkpoint folders. Nothing here imports the probe, TPV, selection, pruning or the
integrations: every layer above may read and write through this one."""

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
