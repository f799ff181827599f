"""TEMPORARY stand-in for valfree.selection.rules and valfree.probes.prediction_changes until they land
on main (then this file is deleted and selectors.py imports the real ones). Same signatures; the rules
here are placeholders (the universal probe and a plain Label Wave rule), not candidates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from valfree.selection import UNIVERSAL_PRESET, ema, select_checkpoint


def prediction_changes(pred) -> np.ndarray:
    pred = np.asarray(pred)
    out = np.full(len(pred), np.nan)
    if len(pred) > 1:
        out[1:] = (pred[1:] != pred[:-1]).mean(axis=1)
    return out


def label_agreement(pred, given) -> np.ndarray:
    return (np.asarray(pred) == np.asarray(given)[None, :]).mean(axis=1)


@dataclass
class RuleChoice:
    index: int
    step: float
    guard_fired: bool | None
    reason: str


def _probe(steps, columns, **options) -> RuleChoice:
    sel = select_checkpoint(steps, columns["grad_norm"], tail=UNIVERSAL_PRESET["tail"], ema=UNIVERSAL_PRESET["ema"], mode="min")
    return RuleChoice(sel.index, float(steps[sel.index]), None, "probe: universal preset")


def _label_wave(steps, columns, patience=0.2, start=2, span=3, **options) -> RuleChoice:
    pc = np.asarray(columns["pred_change"], dtype=float)
    n = len(pc)
    wait = max(1, int(np.ceil(patience * n))) if isinstance(patience, float) else patience
    sm = ema(np.nan_to_num(pc, nan=np.nanmax(pc)), span)
    best = start
    for i in range(start, n):
        if sm[i] < sm[best]:
            best = i
        if i - best >= wait:
            break
    return RuleChoice(best, float(steps[best]), None, "label-wave: first minimum of smoothed PC")


RULES = {"probe": _probe, "label-wave": _label_wave}


def select_by_rule(rule: str, steps, columns: Mapping[str, np.ndarray], **options) -> RuleChoice:
    return RULES[rule](list(steps), columns, **options)


def label_noise_estimate(steps, columns):
    la = np.asarray(columns["label_agreement"], dtype=float)
    i = _label_wave(list(steps), columns).index
    est = float(max(0.0, 1.0 - la[i]))
    return est, max(0.0, est - 0.05), min(1.0, est + 0.05)
