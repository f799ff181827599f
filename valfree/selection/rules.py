"""Selection rules: one call, several ways to turn a run's columns into a chosen checkpoint.

Every rule reads the columns of a scored run (the score CSV's names) and returns a
:class:`RuleChoice`. The registry :data:`RULES` is explicit; ``select_by_rule`` is the one entry point.

- ``probe``: the head-gradient probe's universal preset (EMA span 3, last 20 %, argmin).
- ``label-wave``: the Label Wave point (:mod:`valfree.selection.label_wave`); reads no label.
- ``guarded``: the probe, guarded against memorisation. Let p be the probe's choice and m the Label
  Wave point. If p comes after m and the model gained label agreement between m and p,

      gain = LA_p - LA_m,

  by at least ``min_gain`` with confidence (gain - z SE >= min_gain), then the probe's choice sits in
  a stretch where the model fitted training labels it disagreed with at m, which is what memorising
  wrong labels looks like, and the rule takes m instead. Otherwise it keeps p.
- ``guarded-wave``: as ``guarded``, and the guard also needs the wave itself: smoothed PC must rise
  after m by more than z standard errors of PC_m.

The standard error of the gain. LA_p and LA_m are measured on the same subset of |S| elements, so
gain is a mean of d_x in {-1, 0, 1}. An element can move into or out of agreement only if its
prediction changed somewhere in (m, p], so the fraction that moved, g + l, is at most
B = min(1, sum_{t in (m, p]} PC_t). With Var(d) = g + l - gain^2 <= B - gain^2,

    SE(gain) <= sqrt(max(B - gain^2, 0) / |S|),

a bound that needs only the columns. Without |S| the rule uses the point estimate alone.

The memorised fraction LA_end - LA_m (:func:`memorised_fraction`) estimates how much of the training
set the model fitted only after the Label Wave point: under label noise, the share of wrong labels it
memorised, a lower estimate of the noise rate once the model has fitted them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import numpy as np

from ..errors import ValfreeError
from .label_wave import LABEL_WAVE_DEFAULTS, WaveChoice, label_wave_point
from .select import UNIVERSAL_PRESET, Selection, select_checkpoint

PROBE_COLUMN = "grad_norm"
PC_COLUMN = "pred_change"
LA_COLUMN = "label_agreement"
SUBSET_COLUMN = "pred_subset"
# The training items whose classes are recorded per checkpoint. PC near its minimum is a few per cent;
# its standard error sqrt(p (1 - p) / n) at p = 0.03 is 0.0038 with n = 2048 (0.0027 with 4096, 0.0075
# with 512), small against the rises the Label Wave point and the guard look for, at half the forward
# cost of 4096 (docs/benchmarks.md, "Memorisation": PC stderr against subset size).
DEFAULT_PRED_SUBSET = 2048

# The smallest memorised share the guard is meant to catch: label noise below 5 % costs little, and
# clean runs keep fitting a few per cent of hard examples late in training.
MIN_GAIN = 0.05
Z = 1.96
# Whether the guarded rules' Label Wave point needs a significant new minimum
# (label_wave.significant_drop). Off: on the evidence grid (docs/benchmarks.md, "Choosing the default
# rule") it cut the noisy mean gap from 6.20 to 5.01 points but, like the plain minimum, left 10 of
# 96 runs (all BatchNorm CNNs) worse than the probe by more than a point, so the decision fixed before
# those runs were trained keeps the paper's plain minimum. Pass significant=True to use it.
GUARD_SIGNIFICANT_MINIMUM = False


@dataclass
class Estimate:
    """A value with its standard error and a two-sided 95 % interval."""

    value: float
    stderr: float
    low: float
    high: float

    def as_dict(self) -> dict:
        return {"value": self.value, "stderr": self.stderr, "low": self.low, "high": self.high}


@dataclass
class RuleChoice:
    """A rule's choice and why it was made.

    ``index`` is the position in the input series (as :class:`~valfree.selection.Selection`), ``step``
    its step. ``probe`` is what the probe alone would have chosen and ``wave`` the Label Wave point
    (positions in step order, with ``wave_step``), when the rule computed them. ``guard_fired`` is
    None for rules without a guard. ``gain`` is the label agreement gained between the wave point and
    the probe's choice.
    """

    rule: str
    index: int
    step: float
    reason: str
    guard_fired: bool | None = None
    probe: Selection | None = None
    wave: WaveChoice | None = None
    wave_step: float | None = None
    gain: Estimate | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        out = {"rule": self.rule, "index": self.index, "step": self.step, "reason": self.reason,
               "guard_fired": self.guard_fired, "notes": list(self.notes)}
        if self.probe is not None:
            out["probe_step"] = self.probe.step
        if self.wave is not None:
            out["wave_step"] = self.wave_step
            out["wave_stopped"] = self.wave.stopped_at is not None
        if self.gain is not None:
            out["gain"] = self.gain.as_dict()
        return out


@dataclass(frozen=True)
class RuleOptions:
    """The knobs every rule may read; each rule reads only its own."""

    tail: float | int = UNIVERSAL_PRESET["tail"]
    ema: float = UNIVERSAL_PRESET["ema"]
    column: str = PROBE_COLUMN  # the score the probe part of a rule reads, and its direction
    mode: str = UNIVERSAL_PRESET["mode"]
    patience: float | int = LABEL_WAVE_DEFAULTS["patience"]
    start: float | int = LABEL_WAVE_DEFAULTS["start"]
    pc_window: int = LABEL_WAVE_DEFAULTS["window"]
    min_gain: float = MIN_GAIN
    subset_size: int | None = None
    # Whether a new PC minimum must be significant (label_wave.significant_drop); None: the rule's own
    # default, GUARD_SIGNIFICANT_MINIMUM for the guarded rules, the paper's plain minimum for label-wave.
    significant: bool | None = None


class _Run:
    """A run's columns in step order, and the map back to input positions."""

    def __init__(self, steps: Sequence[float], columns: Mapping[str, Sequence[float]]):
        s = np.asarray(steps, dtype=float)
        if s.ndim != 1 or len(s) == 0:
            raise ValfreeError("the run has no checkpoints to choose from.")
        self.order = np.argsort(s, kind="stable")
        self.steps = s[self.order]
        self.columns = {}
        for name, values in columns.items():
            if values is None:
                continue
            v = np.asarray(values, dtype=float)
            if v.shape != s.shape:
                raise ValfreeError(f"column {name!r} has {v.size} values for {s.size} steps.")
            self.columns[name] = v[self.order]

    def has(self, name: str) -> bool:
        return name in self.columns and bool(np.isfinite(self.columns[name]).any())

    def need(self, name: str, rule: str) -> np.ndarray:
        if not self.has(name):
            raise ValfreeError(
                f"rule {rule!r} needs the column {name!r}, which this run does not have; rescore it with a "
                "current `valfree score` (it records prediction changes), or choose --rule probe."
            )
        return self.columns[name]

    def choice(self, rule: str, position: int, reason: str, **extra) -> RuleChoice:
        return RuleChoice(rule=rule, index=int(self.order[position]), step=float(self.steps[position]), reason=reason, **extra)


def _probe(run: _Run, opts: RuleOptions) -> Selection:
    return select_checkpoint(run.steps, run.need(opts.column, "probe"), tail=opts.tail, ema=opts.ema, mode=opts.mode)


def _wave(run: _Run, opts: RuleOptions, rule: str) -> WaveChoice:
    significant = opts.significant if opts.significant is not None else rule != "label-wave" and GUARD_SIGNIFICANT_MINIMUM
    return label_wave_point(run.need(PC_COLUMN, rule), window=opts.pc_window, patience=opts.patience, start=opts.start,
                            subset_size=_subset_size(run, opts) if significant else None)


def _subset_size(run: _Run, opts: RuleOptions) -> int | None:
    if opts.subset_size:
        return int(opts.subset_size)
    if run.has(SUBSET_COLUMN):
        sizes = run.columns[SUBSET_COLUMN]
        return int(np.nanmin(sizes))
    return None


def agreement_gain(run: _Run, start: int, stop: int, subset_size: int | None) -> Estimate:
    """LA_stop - LA_start with the column-only standard-error bound of the module docstring."""
    la = run.columns[LA_COLUMN]
    pc = run.columns.get(PC_COLUMN)
    gain = float(la[stop] - la[start])
    if subset_size and pc is not None and stop > start:
        moved = float(np.nansum(pc[start + 1 : stop + 1]))
        se = math.sqrt(max(min(1.0, moved) - gain * gain, 0.0) / subset_size)
    else:
        se = 0.0 if stop == start else math.nan
    half = Z * se if math.isfinite(se) else math.nan
    return Estimate(gain, se, gain - half, gain + half)


def _stable_rejections(run: _Run, wave: WaveChoice) -> float:
    """1 - LA_m - PC_m: a lower bound on the share of the subset the model steadily disagrees with at
    the Label Wave point m (see the guarded rule)."""
    return 1.0 - float(run.columns[LA_COLUMN][wave.index]) - float(wave.smoothed[wave.index])


def stable_rejections(steps: Sequence[float], columns: Mapping[str, Sequence[float]], **options) -> float | None:
    """:func:`_stable_rejections` of a run's columns; None when it has no PC or no label agreement."""
    run = _Run(steps, columns)
    if not (run.has(PC_COLUMN) and run.has(LA_COLUMN)):
        return None
    return _stable_rejections(run, _wave(run, RuleOptions(**options), "stable rejections"))


def memorised_fraction(steps: Sequence[float], columns: Mapping[str, Sequence[float]], subset_size: int | None = None,
                       **options) -> tuple[Estimate, float] | None:
    """(LA_end - LA_m, the step of m): the share of the subset the model came to agree with only after
    the Label Wave point m, with a 95 % interval; None when the run has no PC or no label agreement."""
    run = _Run(steps, columns)
    if not (run.has(PC_COLUMN) and run.has(LA_COLUMN)):
        return None
    opts = RuleOptions(subset_size=subset_size, **options)
    wave = _wave(run, opts, "memorised fraction")
    last = int(np.flatnonzero(np.isfinite(run.columns[LA_COLUMN]))[-1])
    return agreement_gain(run, wave.index, max(last, wave.index), _subset_size(run, opts)), float(run.steps[wave.index])


def rule_probe(run: _Run, opts: RuleOptions) -> RuleChoice:
    sel = _probe(run, opts)
    # select_checkpoint was given the step-sorted series, so its index is a sorted position.
    best = "minimum" if opts.mode == "min" else "maximum"
    return run.choice("probe", sel.index, f"the smoothed {best} of {opts.column} in the last {_tail_words(opts.tail)}", probe=sel)


def rule_label_wave(run: _Run, opts: RuleOptions) -> RuleChoice:
    wave = _wave(run, opts, "label-wave")
    how = (f"no new minimum for {wave.patience} checkpoints after it" if wave.stopped_at is not None
           else "the series ended before the patience ran out")
    return run.choice("label-wave", wave.index, f"the first minimum of smoothed prediction changes ({how})",
                      wave=wave, wave_step=float(run.steps[wave.index]))


def _guarded(rule: str, need_rise: bool) -> Callable[[_Run, RuleOptions], RuleChoice]:
    def choose(run: _Run, opts: RuleOptions) -> RuleChoice:
        probe = rule_probe(run, opts)
        p = probe.probe.index
        if not (run.has(PC_COLUMN) and run.has(LA_COLUMN)):
            missing = PC_COLUMN if not run.has(PC_COLUMN) else LA_COLUMN
            probe.rule, probe.guard_fired = rule, None
            probe.notes.append(f"no {missing!r} column: the memorisation guard could not run, so this is the probe's choice")
            return probe
        wave = _wave(run, opts, rule)
        m = wave.index
        n_sub = _subset_size(run, opts)
        gain = agreement_gain(run, m, p, n_sub) if p > m else Estimate(0.0, 0.0, 0.0, 0.0)
        lower = gain.low if math.isfinite(gain.low) else gain.value
        # Rejections must be stable to be memorised later: of the 1 - LA_m the model disagrees with at m,
        # at most PC_m (its churn per checkpoint there) can be mere flicker, so at least
        # 1 - LA_m - PC_m are labels it steadily rejects. A model still churning as much as it disagrees
        # (early, high-learning-rate training) has no settled rejections, whatever it gains later.
        stable_rejections = _stable_rejections(run, wave)
        fired = p > m and lower >= opts.min_gain and stable_rejections >= opts.min_gain
        if fired and need_rise:
            pc = wave.smoothed
            se = math.sqrt(max(pc[m] * (1 - pc[m]), 0.0) / n_sub) if n_sub else 0.0
            after = pc[m + 1 : p + 1]
            fired = bool(np.isfinite(after).any() and np.nanmax(after) > pc[m] + Z * se)
        extra = dict(guard_fired=bool(fired), probe=probe.probe, wave=wave, wave_step=float(run.steps[m]), gain=gain)
        if fired:
            reason = (f"memorisation guard fired: between the prediction-change minimum (step {run.steps[m]:g}) and the "
                      f"probe's choice (step {run.steps[p]:g}) label agreement rose by {gain.value:.3f} "
                      f"(95 % lower bound {lower:.3f} >= {opts.min_gain:g}), so the model was fitting labels it had "
                      "rejected; chose the prediction-change minimum")
            return run.choice(rule, m, reason, **extra)
        if p <= m:
            why = "the probe's choice does not come after the prediction-change minimum"
        elif stable_rejections < opts.min_gain and lower >= opts.min_gain:
            why = (f"at the prediction-change minimum the model still changed {wave.smoothed[m]:.3f} of its predictions per "
                   f"checkpoint, as many as the {1 - float(run.columns[LA_COLUMN][m]):.3f} it disagreed with, so it had no "
                   "settled rejections to memorise")
        else:
            why = f"label agreement rose by only {gain.value:.3f} after the prediction-change minimum (lower bound {lower:.3f})"
        return run.choice(rule, p, f"memorisation guard quiet ({why}); kept the probe's choice", **extra)

    return choose


def _tail_words(tail: float | int) -> str:
    if isinstance(tail, (int, np.integer)) and not isinstance(tail, bool):
        return f"{int(tail)} checkpoints"
    return f"{100 * float(tail):g} % of the run"


RULES: dict[str, Callable[[_Run, RuleOptions], RuleChoice]] = {
    "probe": rule_probe,
    "label-wave": rule_label_wave,
    "guarded": _guarded("guarded", need_rise=False),
    "guarded-wave": _guarded("guarded-wave", need_rise=True),
}

DEFAULT_RULE = "guarded"


def select_by_rule(rule: str, steps: Sequence[float], columns: Mapping[str, Sequence[float]], **options) -> RuleChoice:
    """Choose a checkpoint from a run's columns with the named rule (see :data:`RULES`).

    ``columns`` maps the score CSV's column names (``grad_norm``, ``pred_change``,
    ``label_agreement``, optionally ``pred_subset``) to values aligned with ``steps``. ``options`` are
    the fields of :class:`RuleOptions`.
    """
    if rule not in RULES:
        raise ValfreeError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}.")
    unknown = set(options) - set(RuleOptions.__dataclass_fields__)
    if unknown:
        raise ValfreeError(f"unknown rule option(s) {', '.join(sorted(unknown))}.")
    return RULES[rule](_Run(steps, columns), RuleOptions(**options))


def memorisation_warning(estimate: Estimate | None, wave_step: float | None, min_gain: float = MIN_GAIN,
                         settled: float | None = None) -> str | None:
    """A plain warning when a run looks like it memorised wrong labels: the label agreement gained
    after the Label Wave point is at least ``min_gain`` with 95 % confidence, and (``settled``, from
    :func:`stable_rejections`) the model steadily rejected at least that share there. None otherwise."""
    if estimate is None or not math.isfinite(estimate.value):
        return None
    if settled is not None and settled < min_gain:
        return None
    low = estimate.low if math.isfinite(estimate.low) else estimate.value
    if low < min_gain:
        return None
    return (
        f"this run looks like it memorised wrong labels: after step {wave_step:g}, where prediction changes bottomed "
        f"out, the model came to agree with a further {100 * estimate.value:.1f} % of its training labels "
        f"(95 % interval {100 * low:.1f}-{100 * estimate.high:.1f} %) that it had rejected there; about that share of "
        "the labels is likely wrong, and checkpoints after that step fit them."
    )
