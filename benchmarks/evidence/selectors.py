"""Checkpoint selectors compared on the same trajectories.

A selector maps a run (its checkpoints' rows) to a chosen index; some also look at the *other* runs
(the per-family presets, chosen leave-one-seed-out). Label-free selectors read only label-free
signals; the labelled ones read the small validation sets; the oracle reads the test accuracy and is
the reference every gap is measured against. Every signal selector goes through
:func:`valfree.select_checkpoint`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from valfree.selection import UNIVERSAL_PRESET, select_checkpoint

from valfree.probes.prediction_changes import label_agreement, prediction_changes  # noqa: F401
from valfree.selection.rules import RULES, select_by_rule

try:
    from valfree.selection.rules import label_noise_estimate

    NOISE_ESTIMATOR = "valfree.selection.rules.label_noise_estimate"
except ImportError:
    NOISE_ESTIMATOR = "valfree.selection.rules.memorised_fraction (LA_end - LA_m at the Label Wave point m, 95 % interval)"
  # the library states the noise diagnostic as the memorised fraction
    from valfree.selection.rules import memorised_fraction

    def label_noise_estimate(steps, columns):
        """(estimate, low, high) of the label-noise rate: valfree's memorised fraction LA_end - LA_m
        and its 95 % interval; None where the run has no PC or label agreement."""
        out = memorised_fraction(steps, columns)
        if out is None:
            return None
        est = out[0]
        return est.value, est.low, est.high


try:
    from valfree.selection.rules import DEFAULT_RULE
except ImportError:
    DEFAULT_RULE = None

UNIVERSAL = (UNIVERSAL_PRESET["tail"], UNIVERSAL_PRESET["ema"])
WHOLE_RUN = (1.0, 3)
# Candidate presets for the per-family tuning: tail fraction x EMA span.
PRESET_GRID = [(t, e) for t in (0.1, 0.2, 0.3, 0.5, 1.0) for e in (1, 3, 5, 9)]


@dataclass
class Run:
    """One trajectory with its signals: ``rows`` hold one dict per checkpoint, in step order."""

    name: str
    family: str
    regime: str
    seed: int
    rows: list[dict]
    # predictions.npz as plain arrays (steps, pred [T, S], index, given, true), where it was recorded
    pred: dict | None = None
    # For a run rebuilt from the committed results (carried.py): what it reported that its curves do not hold
    carried: dict | None = None

    @property
    def steps(self) -> list[float]:
        return [r["step"] for r in self.rows]

    def series(self, key: str) -> np.ndarray:
        return np.array([r.get(key, np.nan) for r in self.rows], dtype=float)

    def test_acc(self) -> np.ndarray:
        return self.series("test_acc")


@dataclass
class Selector:
    """``choose(run, all_runs) -> index``. ``signal``/``mode`` name the series it reads (for the
    correlation tables and the planted-optimum check); ``constant_by_design`` marks "last"."""

    name: str
    label: str
    kind: str  # "label-free", "data-free", "labelled", "baseline", "remedy", "oracle"
    choose: Callable[[Run, list[Run]], int]
    signal: str | None = None
    mode: str = "min"
    constant_by_design: bool = False
    needs: tuple[str, ...] = field(default_factory=tuple)

    def available(self, run: Run) -> bool:
        keys = self.needs or ((self.signal,) if self.signal else ())
        return all(np.isfinite(defined_part(k, run.series(k))).all() for k in keys)


# Series whose first value is undefined by construction (PC_0 has no predecessor).
UNDEFINED_FIRST = {"pred_change"}


def defined_part(key: str, x: np.ndarray) -> np.ndarray:
    """The part of a series that must be finite: all of it, or all but the first value of PC."""
    return x[1:] if key in UNDEFINED_FIRST else x


def pick(run: Run, signal: str, mode: str, preset: tuple[float, float]) -> int:
    tail, span = preset
    return select_checkpoint(run.steps, run.series(signal), tail=tail, ema=span, mode=mode).index


def preset_selector(signal: str, mode: str, preset=UNIVERSAL) -> Callable[[Run, list[Run]], int]:
    return lambda run, runs: pick(run, signal, mode, preset)


def gap(run: Run, index: int) -> float:
    """Test-accuracy points between the chosen checkpoint and the best one (evaluation only)."""
    acc = run.test_acc()
    return float(100 * (np.nanmax(acc) - acc[index]))


def family_preset(signal: str, mode: str, train_runs: list[Run]) -> tuple[float, float]:
    """The preset with the smallest mean gap over ``train_runs`` (ties: the universal preset, then
    the grid order). The caller passes runs that exclude the run being evaluated."""
    if not train_runs:
        return UNIVERSAL
    best, best_gap = UNIVERSAL, np.mean([gap(r, pick(r, signal, mode, UNIVERSAL)) for r in train_runs])
    for preset in PRESET_GRID:
        g = np.mean([gap(r, pick(r, signal, mode, preset)) for r in train_runs])
        if g < best_gap - 1e-12:
            best, best_gap = preset, g
    return best


def loso_selector(signal: str, mode: str) -> Callable[[Run, list[Run]], int]:
    """Per-family preset chosen on the same family's *other seeds* (all regimes), applied to this run."""

    def choose(run: Run, runs: list[Run]) -> int:
        others = [r for r in runs if r.family == run.family and r.seed != run.seed]
        return pick(run, signal, mode, family_preset(signal, mode, others))

    return choose


def tpv_guard(run: Run, runs: list[Run]) -> int:
    """Remedy: the universal head-gradient choice, unless Tr(H_eff) says the tail is memorising.

    The guard fires when the smoothed Tr(H_eff) ends the run higher than it entered the tail window
    *and* its whole-run minimum lies before the tail; then it returns that minimum. The rule was fixed
    before the full grid was run (from the TPV paper's reading that rising TPV marks the overfitting
    phase), with no threshold to tune.
    """
    hg = pick(run, "hg_grad_norm", "min", UNIVERSAL)
    sel = select_checkpoint(run.steps, run.series("tpv_trace"), tail=UNIVERSAL[0], ema=UNIVERSAL[1], mode="min")
    start, stop = sel.window
    smoothed = sel.smoothed
    rising = smoothed[stop - 1] > smoothed[start]
    whole = pick(run, "tpv_trace", "min", WHOLE_RUN)
    return whole if rising and whole < start else hg


def tpv_post_peak(run: Run, runs: list[Run]) -> int:
    """Post hoc remedy: the minimum of smoothed Tr(H_eff) *after* its peak before the tail window.

    Added after the first two finished runs showed that the whole-run minimum falls in the underfit
    phase at the start (small TPV, poor accuracy), as the TPV paper describes; the paper's reading is
    that the TPV peak separates the underfit phase from the overfitting phase. Label it post hoc.
    """
    sel = select_checkpoint(run.steps, run.series("tpv_trace"), tail=UNIVERSAL[0], ema=UNIVERSAL[1], mode="min")
    smoothed, start = sel.smoothed, sel.window[0]
    peak = int(np.nanargmax(smoothed[: max(start, 1)]))
    return peak + int(np.nanargmin(smoothed[peak:]))


def tpv_post_peak_guard(run: Run, runs: list[Run]) -> int:
    """Post hoc remedy: the universal probe's choice, unless smoothed Tr(H_eff) rises across the tail
    window; then :func:`tpv_post_peak`."""
    sel = select_checkpoint(run.steps, run.series("tpv_trace"), tail=UNIVERSAL[0], ema=UNIVERSAL[1], mode="min")
    start, stop = sel.window
    if sel.smoothed[stop - 1] > sel.smoothed[start]:
        return tpv_post_peak(run, runs)
    return pick(run, "hg_grad_norm", "min", UNIVERSAL)


def rank_combination(run: Run, runs: list[Run]) -> int:
    """Remedy: whole-run argmin of the mean rank of the EMA-3-smoothed head gradient and Tr(H_eff)
    (both low = good). Smoothing comes before ranking, so that the ranks are not smoothed again."""
    from scipy.stats import rankdata

    from valfree.selection import ema

    hg, tpv = ema(run.series("hg_grad_norm"), UNIVERSAL[1]), ema(run.series("tpv_trace"), UNIVERSAL[1])
    combined = (rankdata(hg) + rankdata(tpv)) / 2
    return select_checkpoint(run.steps, combined, tail=1.0, ema=1, mode="min").index


# Columns the rules read, named as in the scores CSV, from the benchmark's row keys.
RULE_COLUMNS = {"grad_norm": "hg_grad_norm", "pred_change": "pred_change", "label_agreement": "label_agreement"}


def rule_columns(run: Run) -> dict[str, np.ndarray]:
    """The rules' columns, plus ``pred_subset`` (the subset size, as the scores CSV has it) where recorded."""
    cols = {col: run.series(key) for col, key in RULE_COLUMNS.items()}
    subset = run.series("pred_subset")
    if np.isfinite(subset).all():
        cols["pred_subset"] = subset
    return cols


def rule_selector(rule: str) -> Callable[[Run, list[Run]], int]:
    """valfree's selection rule ``rule`` on the run's probe score, PC and label agreement (default options)."""
    return lambda run, runs: int(select_by_rule(rule, run.steps, rule_columns(run)).index)


def argbest(key: str, mode: str) -> Callable[[Run, list[Run]], int]:
    """Whole-run argmax/argmin of a labelled series with no smoothing (validation sets, oracle)."""
    return lambda run, runs: select_checkpoint(run.steps, run.series(key), tail=1.0, ema=1, mode=mode).index


def all_selectors(val_sizes=(100, 500, 1000)) -> list[Selector]:
    s: list[Selector] = []
    for sig, label in (("hg_grad_norm", "raw"), ("hg_score_w", "score_w"), ("hg_score_z", "score_z")):
        s.append(Selector(f"hg_{label}", f"head gradient {label}, universal preset", "label-free", preset_selector(sig, "min"), sig))
        s.append(Selector(f"hg_{label}_family", f"head gradient {label}, per-family preset (leave-one-seed-out)", "label-free", loso_selector(sig, "min"), sig))
    s += [
        Selector("entropy", "entropy on the probe batch, min", "label-free", preset_selector("hg_entropy", "min"), "hg_entropy"),
        Selector("confidence", "confidence on the probe batch, max", "label-free", preset_selector("hg_confidence", "max"), "hg_confidence", "max"),
        Selector("margin", "margin on the probe batch, max", "label-free", preset_selector("hg_margin", "max"), "hg_margin", "max"),
        Selector("pseudo_heldout", "pseudo-label probe on held-out unlabeled images", "remedy", preset_selector("pseudo_grad_norm", "min"), "pseudo_grad_norm"),
        Selector("tpv", "Tr(H_eff) on training inputs, universal preset", "label-free", preset_selector("tpv_trace", "min"), "tpv_trace"),
        Selector("tpv_whole_run", "Tr(H_eff) on training inputs, whole-run argmin", "remedy", preset_selector("tpv_trace", "min", WHOLE_RUN), "tpv_trace"),
        Selector("hg_tpv_guard", "head gradient with a Tr(H_eff) guard", "remedy", tpv_guard, "hg_grad_norm", needs=("hg_grad_norm", "tpv_trace")),
        Selector("tpv_post_peak", "Tr(H_eff) minimum after its pre-tail peak (post hoc)", "remedy", tpv_post_peak, "tpv_trace"),
        Selector("hg_tpv_post_peak_guard", "head gradient, Tr(H_eff) post-peak guard (post hoc)", "remedy", tpv_post_peak_guard, "hg_grad_norm", needs=("hg_grad_norm", "tpv_trace")),
        Selector("hg_tpv_rank", "mean rank of head gradient and Tr(H_eff), whole run", "remedy", rank_combination, "hg_grad_norm", needs=("hg_grad_norm", "tpv_trace")),
        Selector("ww_alpha", "WeightWatcher alpha (data-free), universal preset", "data-free", preset_selector("ww_alpha", "min"), "ww_alpha"),
        Selector("ww_alpha_whole_run", "WeightWatcher alpha (data-free), whole-run argmin", "data-free", preset_selector("ww_alpha", "min", WHOLE_RUN), "ww_alpha"),
    ]
    for rule in RULES:  # every rule valfree offers, by its name (no rule is hard-coded here)
        s.append(Selector(f"rule:{rule}", f"valfree rule {rule!r} (default options)", "rule", rule_selector(rule),
                          "hg_grad_norm", needs=tuple(RULE_COLUMNS.values())))
    s += [
        Selector("last", "last checkpoint", "baseline", lambda run, runs: len(run.rows) - 1, constant_by_design=True),
        Selector("min_train_loss", "minimum training loss (fixed training subset)", "baseline", argbest("train_loss", "min"), "train_loss"),
    ]
    for k in val_sizes:
        s.append(Selector(f"val{k}", f"labelled validation set of {k} images, max accuracy", "labelled", argbest(f"val{k}_acc", "max"), f"val{k}_acc", "max"))
    s.append(Selector("oracle", "oracle (max test accuracy)", "oracle", argbest("test_acc", "max"), "test_acc", "max"))
    return s
