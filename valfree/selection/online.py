"""A selection rule run online: fed one check at a time during training, it says what to keep and
when to stop.

:class:`RuleTracker` holds the series seen so far and asks :func:`~valfree.selection.rules.select_by_rule`
the same question ``valfree select`` asks of a finished run, so training and the command line can
never disagree. What it adds is *when to stop*:

- ``label-wave``: once the Label Wave point is confirmed (its patience ran out);
- ``guarded`` / ``guarded-wave``: once the guard has fired on a confirmed Label Wave point, i.e. the
  model is fitting labels it rejected at that point; or, like ``probe``, when the probe has not
  improved for ``patience`` checks;
- ``probe``: when the EMA-smoothed probe has not reached a new minimum for ``patience`` checks.

No rule stops during the warm-up: the first ``warmup`` checks (a count, or a fraction of
``expected_checks`` when that is known). The probe rises early in training, before the features carry
signal, and prediction changes oscillate while the learning rate is high, so an early minimum of
either says nothing. For the same reason the probe's patience counts from the end of the warm-up: its
best score is the best seen after it (as ``start_from_epoch`` in Keras' early stopping), so that a
minimum during the warm-up cannot run the patience out right after it.

``candidate_steps`` are the steps whose checkpoints a caller must keep: the rule's current choice,
and for the guarded rules also the Label Wave point and the probe's choice, either of which may
become the choice later.
"""

from __future__ import annotations

import math


from ..errors import ValfreeError
from .early_stopping import EarlyStopping
from .label_wave import as_count
from .rules import LA_COLUMN, PC_COLUMN, PROBE_COLUMN, RULES, SUBSET_COLUMN, RuleChoice, select_by_rule

COLUMNS = (PROBE_COLUMN, PC_COLUMN, LA_COLUMN, SUBSET_COLUMN)


def replay_early_stopping(steps, values, patience: int, warmup: int, min_delta: float = 0.0, mode: str = "min",
                          ema: float = 3) -> EarlyStopping:
    """The core :class:`EarlyStopping` fed a whole series, its patience restarted after the first
    ``warmup`` values. Replaying instead of updating one value at a time makes the state a function of
    the series and the warm-up alone, so a resumed run whose expected length changed ends where a run
    of that length from the start would."""
    stopper = EarlyStopping(patience, min_delta=min_delta, mode=mode, ema=ema)
    for i, (step, value) in enumerate(zip(steps, values)):
        if i == warmup:
            stopper.restart()
        stopper.update(step, value)
    return stopper


class RuleTracker:
    """Feed checks with :meth:`update`; read :attr:`choice`, :attr:`stop` and :meth:`candidate_steps`."""

    def __init__(self, rule: str = "guarded", warmup: float | int = 0.2, patience: int = 10,
                 expected_checks: int | None = None, **rule_options):
        if rule not in RULES:
            raise ValfreeError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}.")
        if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
            raise ValfreeError(f"patience must be a whole number of checks >= 1, not {patience!r}.")
        self.rule, self.warmup, self.patience = rule, warmup, patience
        self.expected_checks = expected_checks
        self.rule_options = dict(rule_options)
        self.steps: list[float] = []
        self.series: dict[str, list[float]] = {c: [] for c in COLUMNS}
        self.stopped = False
        select_by_rule("probe", [0.0], {PROBE_COLUMN: [1.0]}, **{k: v for k, v in rule_options.items()})  # validate

    # -- feeding ---------------------------------------------------------------------------------
    def update(self, step: float, **columns: float) -> bool:
        """Record one check (``grad_norm``, ``pred_change``, ``label_agreement``, ``pred_subset``);
        return True once training should stop."""
        unknown = set(columns) - set(COLUMNS)
        if unknown:
            raise ValfreeError(f"unknown column(s) {', '.join(sorted(unknown))}; expected some of {', '.join(COLUMNS)}.")
        if self.steps and step <= self.steps[-1]:
            raise ValfreeError(f"checks must come in increasing step order; got step {step} after {self.steps[-1]}.")
        self.steps.append(float(step))
        for name in COLUMNS:
            value = columns.get(name)
            self.series[name].append(math.nan if value is None else float(value))
        if not self.stopped and len(self.steps) > self.warmup_checks():
            self.stopped = self._should_stop()
        return self.stopped

    def warmup_length(self) -> int:
        """How many checks the warm-up lasted, once it is over (the first ``n`` with
        ``n > warmup_checks()`` at ``n`` checks, minus one); the current count while it lasts."""
        for n in range(1, len(self.steps) + 1):
            if n > self._warmup_checks_at(n):
                return n - 1
        return len(self.steps)

    def warmup_checks(self) -> int:
        return self._warmup_checks_at(len(self.steps))

    def _warmup_checks_at(self, seen: int) -> int:
        if isinstance(self.warmup, float) and not isinstance(self.warmup, bool):
            if self.expected_checks is None:
                # Without a known length, a fraction means that share of the checks seen so far could
                # still be warm-up; a fixed floor keeps the first checks out.
                return max(3, math.ceil(self.warmup * seen))
            return as_count(self.warmup, self.expected_checks, "warmup")
        return as_count(self.warmup, seen or 1, "warmup")

    # -- reading ---------------------------------------------------------------------------------
    def columns(self) -> dict:
        """The series seen so far that hold at least one finite value, by column name."""
        return {k: v for k, v in self.series.items() if any(math.isfinite(x) for x in v)}

    @property
    def choice(self) -> RuleChoice | None:
        """The rule's choice on the checks seen so far (None before the first usable check)."""
        if not self.steps:
            return None
        try:
            return select_by_rule(self.rule, self.steps, self.columns(), **self.rule_options)
        except ValfreeError:
            return None  # not enough of the needed columns yet

    def candidate_steps(self) -> set[float]:
        choice = self.choice
        if choice is None:
            return set()
        keep = {choice.step}
        if choice.probe is not None:
            keep.add(choice.probe.step)
        if choice.wave_step is not None:
            keep.add(choice.wave_step)
        return keep

    def _probe_stalled(self) -> bool:
        """The core :class:`EarlyStopping` rule replayed over the probe series seen so far."""
        values = self.series[PROBE_COLUMN]
        if not any(math.isfinite(v) for v in values):
            return False
        return replay_early_stopping(self.steps, values, self.patience, self.warmup_length(),
                                     ema=self.rule_options.get("ema", 3)).stopped

    def _should_stop(self) -> bool:
        choice = self.choice
        if choice is None:
            return False
        if self.rule == "probe":
            return self._probe_stalled()
        wave_confirmed = choice.wave is not None and choice.wave.stopped_at is not None
        if self.rule == "label-wave":
            return wave_confirmed
        return bool(wave_confirmed and choice.guard_fired) or self._probe_stalled()

    # -- state -----------------------------------------------------------------------------------
    _STATE_KEYS = {"rule", "warmup", "patience", "expected_checks", "rule_options", "steps", "series", "stopped"}

    def state_dict(self) -> dict:
        return {"rule": self.rule, "warmup": self.warmup, "patience": self.patience,
                "expected_checks": self.expected_checks, "rule_options": dict(self.rule_options),
                "steps": list(self.steps), "series": {k: list(v) for k, v in self.series.items()},
                "stopped": self.stopped}

    def load_state_dict(self, state: dict) -> None:
        keys = set(state)
        if keys != self._STATE_KEYS:
            missing, extra = self._STATE_KEYS - keys, keys - self._STATE_KEYS
            raise ValfreeError(
                "not a RuleTracker state: "
                + "; ".join(filter(None, [missing and f"missing {', '.join(sorted(missing))}",
                                          extra and f"unexpected {', '.join(sorted(extra))}"]))
                + "."
            )
        series = state["series"]
        if set(series) != set(COLUMNS) or any(len(v) != len(state["steps"]) for v in series.values()):
            raise ValfreeError("not a RuleTracker state: its series do not match its steps.")
        self.rule, self.warmup, self.patience = state["rule"], state["warmup"], state["patience"]
        self.expected_checks, self.rule_options = state["expected_checks"], dict(state["rule_options"])
        self.steps = [float(s) for s in state["steps"]]
        self.series = {k: [float(x) for x in v] for k, v in series.items()}
        self.stopped = bool(state["stopped"])
