"""The bookkeeping every training integration shares: the score series, the choice, the files to keep.

A :class:`ScoreTracker` takes one probe result (and the prediction-change columns) per check and

- feeds them to the selection layer's :class:`~valfree.selection.online.RuleTracker`, which asks the
  same rule ``valfree select --rule`` asks of the CSV afterwards, so the choice made during training is
  the one the command makes;
- decides when to stop: never during the warm-up; after it, when the probe's smoothed score has not
  improved by ``min_delta`` for ``patience`` checks (rules ``probe``, ``guarded``, ``guarded-wave``),
  or when the Label Wave point is confirmed (``label-wave``) and, for the guarded rules, the
  memorisation guard has fired on it;
- tells the caller which saved checkpoints can be deleted (retention, below);
- writes one row per check to the results store, in the format of ``valfree score``.

Retention. With a tail window the checkpoint chosen at the end need not be among the best k seen so
far: a better, older point may leave the window first. So during training a checkpoint is deleted only
once it can no longer be among the k best of any future window: when it has left the tail window, or
when k checkpoints recorded *after* it have a better smoothed score. The rule's candidates (its
current choice, the probe's choice and the Label Wave point, any of which may become the choice when
the guard fires or stops firing) are never deleted. So during training up to k plus those (at most
two) extra files exist; :meth:`ScoreTracker.finish` then keeps exactly k: the final choice and the
k - 1 best smoothed scores among the rest.
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
from ..selection import MODES, EarlyStopping, Selection, ema_step, tail_window
from ..selection.online import RuleTracker, replay_early_stopping
from ..selection.rules import DEFAULT_RULE, LA_COLUMN, PC_COLUMN, PROBE_COLUMN, RULES, SUBSET_COLUMN, RuleChoice

SCORE_FIELDS = tuple(f.name for f in fields(HeadGradient) if f.type in ("float", float))
PC_COLUMNS = (PC_COLUMN, LA_COLUMN, SUBSET_COLUMN)
#: The warm-up: no rule stops in the first 20 % of the checks a run is expected to make (or, when its
#: length is unknown, in its first three checks and the first 20 % of those seen so far). Chosen by
#: benchmarks/warmup.py (the online stop replayed on the 96 evidence runs, patience 10) as the smallest
#: warm-up within 0.1 points of no early stopping on clean runs (guarded: 1.10 against 1.06; none:
#: 3.15, 0.1: 1.30) that also keeps the noisy gain (4.67 against 6.20 without stopping).
DEFAULT_WARMUP = 0.2
DEFAULT_PATIENCE = 10


def needs_predictions(rule: str) -> bool:
    """Whether the rule reads prediction changes (every rule but ``probe``)."""
    return rule != "probe"


@dataclass
class Best:
    """The checkpoint the selection rule chooses now: its step, smoothed and raw score, and file (or '').

    ``choice`` is the rule's full answer (why it chose, whether the memorisation guard fired)."""

    step: int
    score: float
    raw_score: float
    path: str
    selection: Selection | None
    choice: RuleChoice | None = None


class ScoreTracker:
    """Series, selection, retention, early stopping and results rows for one training run.

    ``score`` is the probe field to follow (``grad_norm``, ``score_w``, ``score_z``, ``loss``, ...),
    ``mode`` its direction; it is the rule's probe column (negated for ``mode="max"``). ``rule`` is a
    name of :data:`valfree.selection.rules.RULES`; ``tail`` and ``ema`` its probe settings.
    ``save_top_k``: how many checkpoints to keep (see the module docstring); -1 keeps all, 0 saves
    none. ``patience`` enables early stopping (None: never stop); ``min_delta`` is the smallest
    improvement of the smoothed probe that resets it; ``warmup`` a count of checks or a fraction of
    ``expected_checks``. ``results`` is a CSV path; ``writer`` says whether this process writes it
    (rank 0 under DDP).
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
        *,
        rule: str = DEFAULT_RULE,
        warmup: float | int = DEFAULT_WARMUP,
        expected_checks: int | None = None,
    ):
        if score not in SCORE_FIELDS:
            raise ValfreeError(f"score {score!r} is not a probe field; use one of {', '.join(SCORE_FIELDS)}.")
        if mode not in MODES:
            raise ValfreeError(f"mode must be 'min' or 'max', not {mode!r}.")
        if save_top_k is None or save_top_k < -1:
            raise ValfreeError(f"save_top_k must be -1 (keep all), 0 (save none) or a positive count, not {save_top_k!r}.")
        if rule not in RULES:
            raise ValfreeError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}.")
        tail_window(1, tail)  # validates tail with the core's own message
        self.score, self.mode, self.tail, self.ema, self.save_top_k = score, mode, tail, ema, int(save_top_k)
        self.rule, self.patience, self.min_delta = rule, patience, float(min_delta)
        self.early_stopping = EarlyStopping(patience, min_delta, mode, ema) if patience else None
        self.rules = RuleTracker(rule, warmup=warmup, patience=int(patience) if patience else DEFAULT_PATIENCE,
                                 expected_checks=expected_checks, tail=tail, ema=ema)
        self.results = ResultsStore(results) if results is not None and writer else None
        self.steps: list[int] = []
        self.values: list[float] = []
        self.smoothed: list[float] = []
        self.paths: list[str] = []
        self.kept: dict[int, int] = {}  # index -> how many later points have a better smoothed score
        self._ema_state = math.nan
        self.stopped = False

    @property
    def warmup(self):
        return self.rules.warmup

    @property
    def expected_checks(self) -> int | None:
        return self.rules.expected_checks

    @expected_checks.setter
    def expected_checks(self, value: int | None) -> None:
        self.rules.expected_checks = None if value is None else max(1, int(value))

    def in_warmup(self) -> bool:
        return len(self.steps) <= self.rules.warmup_checks()

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
        columns: dict | None = None,
    ) -> dict | None:
        """Add one check; return its results row when a results file is written (else None).

        ``columns`` are the prediction-change columns of this check (``pred_change``,
        ``label_agreement``, ``pred_subset``), when measured. ``path`` is where this check's checkpoint
        would go. If the retention rule keeps it, ``save(path)`` is called once the tracker's state
        already includes this check (so a checkpoint that stores the tracker's state describes itself,
        as Lightning's ModelCheckpoint does). ``remove(path)`` deletes a checkpoint that can no longer
        be chosen.
        """
        if self.steps and step <= self.steps[-1]:
            raise ValfreeError(
                f"step {step} does not come after the last recorded step {self.steps[-1]}; pass increasing steps."
            )
        columns = {k: v for k, v in (columns or {}).items() if k in PC_COLUMNS}
        value = float(getattr(probe, self.score))
        smoothed = self._smooth(value)
        index = len(self.steps)
        keep = bool(path) and save is not None and self.save_top_k != 0 and math.isfinite(smoothed)
        path = path if keep else ""
        self.steps.append(int(step))
        self.values.append(value)
        self.smoothed.append(smoothed)
        self.paths.append(path)
        self.rules.update(step, **{PROBE_COLUMN: value if self.mode == "min" else -value}, **columns)
        if keep:
            self.kept[index] = 0
        for old in self._retire(index, smoothed):
            if remove is not None and self.paths[old]:
                remove(self.paths[old])
        probe_stalled = self._replay_early_stopping().stopped if self.early_stopping is not None else False
        if self.early_stopping is not None and not self.stopped and not self.in_warmup():
            self.stopped = self._rule_says_stop(probe_stalled)
        if keep:
            save(path)
        if self.results is None:
            return None  # building the row costs more than the piggyback probe itself
        row = {"step": int(step)}
        if path:
            # Rows without a file carry no path, so that the store does not take them for one key.
            row.update(identity_columns(path, missing_ok=True))
        row.update(status=STATUS_OK, error="", **probe_row(probe))
        row.update(columns)
        self.results.append(row)
        return row

    def _replay_early_stopping(self) -> EarlyStopping:
        """The probe's early stopping over the series so far, its patience counted from the end of the
        warm-up (selection.online.replay_early_stopping)."""
        self.early_stopping = replay_early_stopping(self.steps, self.values, self.patience, self.rules.warmup_length(),
                                                    self.min_delta, self.mode, self.ema)
        return self.early_stopping

    def _rule_says_stop(self, probe_stalled: bool) -> bool:
        if self.rule == "probe":
            return probe_stalled
        choice = self.rules.choice
        wave_confirmed = choice is not None and choice.wave is not None and choice.wave.stopped_at is not None
        if self.rule == "label-wave":
            return wave_confirmed
        return bool(wave_confirmed and choice.guard_fired) or probe_stalled

    def _protected(self) -> set[int]:
        steps = self.rules.candidate_steps()
        return {i for i, s in enumerate(self.steps) if s in steps}

    def _retire(self, new_index: int, new_smoothed: float) -> list[int]:
        """Indices of kept checkpoints that the point just added makes unselectable forever, except the
        rule's current candidates (see the module docstring)."""
        if self.save_top_k < 0:
            return []
        start, _ = tail_window(new_index + 1, self.tail)
        protected = self._protected()
        retired = []
        for i in sorted(self.kept):
            if i == new_index:
                continue
            if math.isfinite(new_smoothed) and self._better(new_smoothed, self.smoothed[i]):
                self.kept[i] += 1
            if (i < start or self.kept[i] >= self.save_top_k) and i not in protected:
                retired.append(i)
        for i in retired:
            del self.kept[i]
        return retired

    def finish(self, remove: Callable[[str], None] | None = None, keep_last: bool = False) -> list[str]:
        """At the end of training keep exactly ``save_top_k`` files: the final choice, then the best
        smoothed scores among the others (and, with ``keep_last``, also the latest file, to resume
        from). Returns the removed paths (``remove`` is called on each)."""
        if self.save_top_k < 0 or not self.kept:
            return []
        best = self.best()
        chosen = {self.steps.index(best.step)} if best is not None and best.path else set()
        others = sorted((i for i in self.kept if i not in chosen),
                        key=lambda i: (self.smoothed[i] if self.mode == "min" else -self.smoothed[i], -i))
        keep = chosen | set(others[: max(self.save_top_k - len(chosen), 0)])
        if keep_last:
            keep.add(max(self.kept))
        removed = [self.paths[i] for i in sorted(self.kept) if i not in keep]
        self.kept = {i: c for i, c in self.kept.items() if i in keep}
        for path in removed:
            if remove is not None and path:
                remove(path)
        return removed

    # ----- reading ----------------------------------------------------------------------------------

    def best(self) -> Best | None:
        """The checkpoint the rule chooses from the series so far (None before the first finite score)."""
        if not self.steps or not np.isfinite(self.values).any():
            return None
        choice = self.rules.choice
        if choice is None and self.rule != "probe":
            # label-wave before any prediction change was measured: the probe is all there is
            try:
                from ..selection.rules import select_by_rule

                choice = select_by_rule("probe", self.rules.steps, self.rules.columns(), tail=self.tail, ema=self.ema)
            except ValfreeError:
                choice = None
        if choice is None:
            return None
        i = choice.index
        return Best(self.steps[i], self.smoothed[i], self.values[i], self.paths[i], choice.probe, choice)

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
            "rules": self.rules.state_dict(),
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
        if state.get("rules"):
            expected = self.rules.expected_checks
            self.rules.load_state_dict(state["rules"])
            if self.rules.rule != self.rule:
                raise ValfreeError(
                    f"the saved state follows rule={self.rules.rule!r} but this run uses rule={self.rule!r}; "
                    "resume with the same settings or start a new run."
                )
            if expected is not None:
                self.rules.expected_checks = expected
        else:  # a state saved before the rule was tracked: replay the probe series into it
            self.rules = RuleTracker(self.rule, warmup=self.rules.warmup, patience=self.rules.patience,
                                     expected_checks=self.rules.expected_checks, tail=self.tail, ema=self.ema)
            for s, v in zip(self.steps, self.values):
                self.rules.update(s, **{PROBE_COLUMN: v if self.mode == "min" else -v})
        if self.early_stopping is not None and self.steps:
            self._replay_early_stopping()
