"""The bookkeeping every training integration shares: the score series, the choice, the files to keep.

A :class:`ScoreTracker` takes one probe result per check and

- smooths the chosen score with the core EMA and feeds the core early-stopping rule;
- chooses the best checkpoint with the core selection rule (EMA, tail window, argmin), so the
  choice made during training is the one ``valfree select`` makes on the CSV afterwards;
- tells the caller which saved checkpoints can be deleted (top-k retention, below);
- writes one row per check to the results store, in the format of ``valfree score``.

Retention. With a tail window the checkpoint chosen at the end need not be among the best k seen so
far: a better, older point may leave the window first. So a checkpoint is deleted only once it can no
longer be among the k best of any future window: when it has left the tail window, or when k
checkpoints recorded *after* it have a better smoothed score (those stay in every window it is in).
The checkpoints kept are therefore always a superset of the k best of the current window, the best
is never deleted, and for a score that keeps improving exactly the latest k are kept.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np

from ..errors import ValfreeError
from ..io.results import STATUS_OK, ResultsStore, identity_columns, probe_row
from ..probes import HeadGradient
from ..selection import MODES, EarlyStopping, Selection, ema, ema_step, select_checkpoint, tail_window

SCORE_FIELDS = tuple(f.name for f in fields(HeadGradient) if f.type in ("float", float))


@dataclass
class Best:
    """The checkpoint the selection rule chooses now: its step, smoothed and raw score, and file (or '')."""

    step: int
    score: float
    raw_score: float
    path: str
    selection: Selection


class ScoreTracker:
    """Series, selection, retention, early stopping and results rows for one training run.

    ``score`` is the probe field to follow (``grad_norm``, ``score_w``, ``score_z``, ``loss``, ...),
    ``mode`` its direction; ``tail`` and ``ema`` are the selection rule of
    :func:`valfree.select_checkpoint`. ``save_top_k``: how many checkpoints the retention rule aims at
    (see the module docstring); -1 keeps all, 0 saves none. ``patience`` enables early stopping on the
    EMA-smoothed score (the core :class:`valfree.EarlyStopping`). ``results`` is a CSV path; ``writer``
    says whether this process writes it (rank 0 under DDP).
    """

    def __init__(
        self,
        score: str = "grad_norm",
        mode: str = "min",
        tail: float | int = 0.2,
        ema: float = 3,
        save_top_k: int = 1,
        patience: int | None = None,
        min_delta: float = 0.0,
        results: str | os.PathLike | None = None,
        writer: bool = True,
    ):
        if score not in SCORE_FIELDS:
            raise ValfreeError(f"score {score!r} is not a probe field; use one of {', '.join(SCORE_FIELDS)}.")
        if mode not in MODES:
            raise ValfreeError(f"mode must be 'min' or 'max', not {mode!r}.")
        if save_top_k is None or save_top_k < -1:
            raise ValfreeError(f"save_top_k must be -1 (keep all), 0 (save none) or a positive count, not {save_top_k!r}.")
        tail_window(1, tail)  # validates tail with the core's own message
        self.score, self.mode, self.tail, self.ema, self.save_top_k = score, mode, tail, ema, int(save_top_k)
        self.early_stopping = EarlyStopping(patience, min_delta, mode, ema) if patience else None
        self.results = ResultsStore(results) if results is not None and writer else None
        self.steps: list[int] = []
        self.values: list[float] = []
        self.smoothed: list[float] = []
        self.paths: list[str] = []
        self.kept: dict[int, int] = {}  # index -> how many later points have a better smoothed score
        self._ema_state = math.nan
        self.stopped = False

    # ----- recording --------------------------------------------------------------------------------

    def _smooth(self, value: float) -> float:
        """The next EMA value, by the core recurrence (the series matches ``valfree.selection.ema``
        over the whole run without recomputing it at every check); NaN for a non-finite value."""
        if not math.isfinite(value):
            return math.nan
        self._ema_state = ema_step(self._ema_state, value, self.ema)
        return self._ema_state

    def _better(self, a: float, b: float) -> bool:
        return a < b if self.mode == "min" else a > b

    def record(
        self,
        step: int,
        probe: HeadGradient,
        path: str = "",
        save: Callable[[str], None] | None = None,
        remove: Callable[[str], None] | None = None,
    ) -> dict | None:
        """Add one check; return its results row when a results file is written (else None).

        ``path`` is where this check's checkpoint would go. If the retention rule keeps it,
        ``save(path)`` is called once the tracker's state already includes this check (so a checkpoint
        that stores the tracker's state describes itself, as Lightning's ModelCheckpoint does).
        ``remove(path)`` deletes a checkpoint that can no longer be chosen.
        """
        if self.steps and step <= self.steps[-1]:
            raise ValfreeError(
                f"step {step} does not come after the last recorded step {self.steps[-1]}; pass increasing steps."
            )
        value = float(getattr(probe, self.score))
        smoothed = self._smooth(value)
        index = len(self.steps)
        keep = bool(path) and save is not None and self.save_top_k != 0 and math.isfinite(smoothed)
        path = path if keep else ""
        self.steps.append(int(step))
        self.values.append(value)
        self.smoothed.append(smoothed)
        self.paths.append(path)
        for old in self._retire(index, smoothed):
            if remove is not None and self.paths[old]:
                remove(self.paths[old])
        if keep:
            self.kept[index] = 0
        if self.early_stopping is not None:
            self.stopped = self.early_stopping.update(step, value) or self.stopped
        if keep:
            save(path)
        if self.results is None:
            return None  # building the row costs more than the piggyback probe itself
        row = {"step": int(step)}
        if path:
            # Rows without a file carry no path, so that the store does not take them for one key.
            row.update(identity_columns(path, missing_ok=True))
        row.update(status=STATUS_OK, error="", **probe_row(probe))
        self.results.append(row)
        return row

    def _retire(self, new_index: int, new_smoothed: float) -> list[int]:
        """Indices of kept checkpoints that the point just added makes unselectable forever."""
        if self.save_top_k < 0:
            return []
        start, _ = tail_window(new_index + 1, self.tail)
        retired = []
        for i in sorted(self.kept):
            if i < start:
                retired.append(i)
                continue
            if math.isfinite(new_smoothed) and self._better(new_smoothed, self.smoothed[i]):
                self.kept[i] += 1
                if self.kept[i] >= self.save_top_k:
                    retired.append(i)
        for i in retired:
            del self.kept[i]
        return retired

    # ----- reading ----------------------------------------------------------------------------------

    def best(self) -> Best | None:
        """The checkpoint the selection rule chooses from the series so far (None before the first
        finite score)."""
        if not self.steps or not np.isfinite(self.values).any():
            return None
        try:
            sel = select_checkpoint(self.steps, self.values, tail=self.tail, ema=self.ema, mode=self.mode)
        except ValfreeError:  # every score in the window is NaN: nothing can be chosen yet
            return None
        return Best(self.steps[sel.index], sel.score, sel.raw_score, self.paths[sel.index], sel)

    @property
    def kept_paths(self) -> list[str]:
        return [self.paths[i] for i in sorted(self.kept)]

    def should_stop(self) -> bool:
        return self.stopped

    # ----- resume -----------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {
            "score": self.score,
            "mode": self.mode,
            "tail": self.tail,
            "ema": self.ema,
            "save_top_k": self.save_top_k,
            "steps": list(self.steps),
            "values": list(self.values),
            "smoothed": list(self.smoothed),
            "paths": list(self.paths),
            "kept": {int(k): int(v) for k, v in self.kept.items()},
            "ema_state": self._ema_state,
            "stopped": self.stopped,
            "early_stopping": self.early_stopping.state_dict() if self.early_stopping is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        for key in ("score", "mode"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ValfreeError(
                    f"the saved state follows {key}={state[key]!r} but this run uses {key}={getattr(self, key)!r}; "
                    "resume with the same settings or start a new run."
                )
        self.steps = [int(s) for s in state["steps"]]
        self.values = [float(v) for v in state["values"]]
        self.smoothed = [float(v) for v in state["smoothed"]]
        self.paths = [str(p) for p in state["paths"]]
        self.kept = {int(k): int(v) for k, v in state["kept"].items()}
        self._ema_state = float(state["ema_state"])
        self.stopped = bool(state["stopped"])
        if self.early_stopping is not None and state.get("early_stopping"):
            self.early_stopping.load_state_dict(state["early_stopping"])
