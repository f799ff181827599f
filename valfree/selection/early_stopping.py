"""Early stopping on a smoothed, label-free score."""

from __future__ import annotations

import math

from ..errors import ValfreeError
from .select import MODES
from .smoothing import ema_step


class EarlyStopping:
    """Stop when the EMA-smoothed score has not improved by ``min_delta`` for ``patience`` updates.

    ``mode="min"`` for the head gradient. Non-finite scores count as no improvement. The state is a
    plain dict (``state_dict``/``load_state_dict``), so it survives a resumed run.
    """

    def __init__(self, patience: int = 5, min_delta: float = 0.0, mode: str = "min", ema: float = 3):
        if mode not in MODES:
            raise ValfreeError(f"mode must be 'min' or 'max', not {mode!r}.")
        if patience < 1:
            raise ValfreeError(f"patience must be at least 1, not {patience}.")
        self.patience, self.min_delta, self.mode, self.ema = patience, float(min_delta), mode, ema
        self.smoothed = math.nan
        self.best = math.nan
        self.best_step: float | None = None
        self.wait = 0
        self.stopped = False

    def improved(self, value: float) -> bool:
        if math.isnan(self.best):
            return True
        if self.mode == "min":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def restart(self) -> None:
        """Forget the best score and the wait, keep the smoothing: improvements count from the next
        update on. Called where a warm-up ends, so that a low score during the warm-up (the probe
        starts low before the features carry signal) cannot run the patience out right after it."""
        self.best, self.best_step, self.wait, self.stopped = math.nan, None, 0, False

    def update(self, step: float, score: float) -> bool:
        """Feed one score; return True once training should stop."""
        if math.isfinite(score):
            self.smoothed = ema_step(self.smoothed, score, self.ema)
            if self.improved(self.smoothed):
                self.best, self.best_step, self.wait = self.smoothed, step, 0
                return self.stopped
        self.wait += 1
        if self.wait >= self.patience:
            self.stopped = True
        return self.stopped

    def state_dict(self) -> dict:
        return {
            "smoothed": self.smoothed,
            "best": self.best,
            "best_step": self.best_step,
            "wait": self.wait,
            "stopped": self.stopped,
            "patience": self.patience,
            "min_delta": self.min_delta,
            "mode": self.mode,
            "ema": self.ema,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved. Any other set of keys is refused: setting unknown
        attributes would hide a state saved by something else, and a missing key would leave this
        object half restored."""
        expected = set(self.state_dict())
        unknown, missing = sorted(set(state) - expected), sorted(expected - set(state))
        if unknown or missing:
            problems = [f"unknown keys {', '.join(unknown)}" if unknown else "",
                        f"missing keys {', '.join(missing)}" if missing else ""]
            raise ValfreeError(
                f"the early-stopping state has {' and '.join(p for p in problems if p)}; "
                "pass the dict that EarlyStopping.state_dict() returned."
            )
        for key in expected:
            setattr(self, key, state[key])
