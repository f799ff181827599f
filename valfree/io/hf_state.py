"""Reading the probe series that ``valfree.huggingface.LabelFreeCallback`` stores in a Hugging Face run.

The callback appends one ``log_history`` entry per save with keys ``valfree/<field>`` and
``valfree/checkpoint``; the Trainer writes the history into every ``checkpoint-N/trainer_state.json``.
The newest such file therefore holds the whole series, and ``valfree select OUTPUT_DIR`` can choose
from it without re-scoring anything.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import ValfreeError
from .results import STATUS_OK

LOG_PREFIX = "valfree/"
_CHECKPOINT_DIR = re.compile(r"checkpoint-(\d+)$")


def newest_trainer_state(folder: Path) -> Path:
    """The trainer_state.json with the most history: the run folder's own, or its newest checkpoint's."""
    candidates = [folder / "trainer_state.json"] + sorted(
        (p / "trainer_state.json" for p in folder.iterdir() if p.is_dir() and _CHECKPOINT_DIR.search(p.name)),
        key=lambda p: int(_CHECKPOINT_DIR.search(p.parent.name).group(1)),
    )
    existing = [p for p in candidates if p.exists()]
    if not existing:
        raise ValfreeError(
            f"{folder} has no trainer_state.json, neither itself nor in a checkpoint-N/ folder; "
            "pass the Trainer's output_dir, or a CSV written by 'valfree score'."
        )
    return max(existing, key=lambda p: _global_step(p))


def _global_step(path: Path) -> int:
    try:
        return int(json.loads(path.read_text()).get("global_step", 0))
    except (OSError, ValueError):
        return -1


def rows_from_trainer_state(folder: str | Path) -> list[dict]:
    """One results-store row per probed save of a Hugging Face run, with paths to its checkpoint folders."""
    folder = Path(folder)
    state_path = newest_trainer_state(folder)
    try:
        history = json.loads(state_path.read_text()).get("log_history", [])
    except (OSError, ValueError) as exc:
        raise ValfreeError(f"cannot read {state_path} as JSON ({exc}).") from None
    run_dir = state_path.parent.parent if _CHECKPOINT_DIR.search(state_path.parent.name) else state_path.parent
    rows = []
    for entry in history:
        if LOG_PREFIX + "checkpoint" not in entry:
            continue
        row = {"step": entry.get("step"), "path": str(run_dir / entry[LOG_PREFIX + "checkpoint"]), "status": STATUS_OK}
        row.update({k[len(LOG_PREFIX):]: v for k, v in entry.items() if k.startswith(LOG_PREFIX) and k != LOG_PREFIX + "checkpoint"})
        rows.append(row)
    if not rows:
        raise ValfreeError(
            f"{state_path} records no valfree probe; train with valfree.huggingface.LabelFreeCallback, "
            "or score the checkpoint-N/ folders with 'valfree score'."
        )
    return rows
