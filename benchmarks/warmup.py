"""The early-stopping warm-up, measured: the online stop of the training integrations replayed on the
committed evidence trajectories, for warm-ups fixed up front.

    python benchmarks/warmup.py        # about 15 s; writes benchmarks/results/warmup.json, prints the tables

What is replayed. Each trajectory under ``curves`` in ``benchmarks/results/evidence_all.json`` (71
runs of 30 checks: MLP, ViT and ResNet, clean and noisy-label regimes) is fed one check at a time to
the :class:`~valfree.integrations.tracking.ScoreTracker` that ``valfree.Monitor`` and the Lightning
and Hugging Face callbacks share, which holds the core :class:`~valfree.selection.EarlyStopping` and
the selection layer's :class:`~valfree.selection.online.RuleTracker`. The columns are the ones a
callback records at a check: the probe (``hg_grad_norm``), ``pred_change``, ``label_agreement`` and
the subset size of the run. The run's length is known (``expected_checks=30``, as for a callback that
knows its number of steps), the patience is ``DEFAULT_PATIENCE`` and every other option is the
default. The run stops at the first check after which ``should_stop()`` is true, as a training loop
that breaks on it would; the checkpoint it restores is the tracker's choice at that check
(``ScoreTracker.best()``, what ``load_best()`` loads). "No early stopping" is the same tracker with
``patience=None`` fed all 30 checks.

Warm-ups: none (0), 0.1, 0.2 and 0.3 of the expected checks, and a count of 3 checks. Rules: the
default (``guarded``) and ``probe``. A run is noisy when its regime's name contains ``noisy``,
``asym`` or ``tiny`` (they train on wrong labels), clean otherwise. Per warm-up, rule and
clean/noisy:

- premature: the share of runs that stopped more than 3 checks (a tenth of the run) before the
  checkpoint of best test accuracy;
- gap: the mean, over runs, of the best test accuracy of the run minus the test accuracy of the
  restored checkpoint, in points;
- checks: the mean number of checks the run took (of 30), i.e. the compute early stopping saved.

Decision rule (written down and committed before any number was computed):

1. A warm-up passes when, for both rules, (a) its clean mean gap is within 0.1 points of the clean
   mean gap without early stopping, and (b) its noisy mean gap is no more than 0.25 points above the
   noisy mean gap without early stopping.
2. The candidates for the default are none (0) and the fractions 0.1, 0.2 and 0.3. The count of 3
   checks is reported for comparison only: a count does not scale with the run's length (on these
   30-check runs it equals 0.1, and it is what any fraction below 0.75 amounts to when the length is
   unknown, see ``RuleTracker.warmup_checks``).
3. The default is the smallest candidate that passes, the least warm-up that costs no accuracy, so
   that early stopping saves the most compute. It replaces 0.2 only if, with the default rule, it
   saves at least 0.5 checks per run on average over all runs: equal outcomes are no reason to change
   a default, and a longer warm-up is the safer one on runs unlike these.
4. If no candidate passes, 0.2 stays only if no other candidate has a smaller clean mean gap with
   the default rule; otherwise that candidate becomes the default, and the docs say that early
   stopping costs accuracy on these runs.

Added after the first result, and not part of the decision: the same replay at patience 5 and 3
(``--patience``), because at the default patience of 10 the probe cannot stop before its 11th check,
so on 30-check runs a warm-up of up to 9 checks rarely binds.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from valfree.integrations.tracking import DEFAULT_PATIENCE, DEFAULT_WARMUP, ScoreTracker  # noqa: E402
from valfree.selection.rules import DEFAULT_RULE  # noqa: E402

EVIDENCE = ROOT / "benchmarks" / "results" / "evidence_all.json"
RESULTS = ROOT / "benchmarks" / "results" / "warmup.json"
#: (label, the warm-up as the integrations take it, whether it is a candidate for the default)
WARMUPS = (("none", 0, True), ("0.1", 0.1, True), ("0.2", 0.2, True), ("0.3", 0.3, True), ("3 checks", 3, False))
RULES = (DEFAULT_RULE, "probe")
EARLY_BY = 3  # "stopped before the best checkpoint by more than a few": more than this many checks
CLEAN_TOLERANCE, NOISY_TOLERANCE, MIN_SAVING = 0.1, 0.25, 0.5  # the decision rule's thresholds (points, points, checks)
NOISY_MARKS = ("noisy", "asym", "tiny")


def is_noisy(regime: str) -> bool:
    return any(mark in regime for mark in NOISY_MARKS)


def replay(columns: dict, rule: str, warmup, patience: int | None = DEFAULT_PATIENCE) -> tuple[int, int]:
    """Feed a run's checks one at a time to the integrations' tracker, as a callback would, and stop at
    the first check after which it says stop. ``columns`` maps ``grad_norm`` (required),
    ``pred_change``, ``label_agreement`` and ``pred_subset`` to one value per check. Returns (checks
    taken, position of the checkpoint the tracker would restore)."""
    probe = columns["grad_norm"]
    n = len(probe)
    tracker = ScoreTracker(patience=patience, rule=rule, warmup=warmup, expected_checks=n)
    for i in range(n):
        extra = {k: v[i] for k, v in columns.items() if k != "grad_norm" and v is not None and math.isfinite(v[i])}
        tracker.record(i + 1, SimpleNamespace(grad_norm=float(probe[i])), columns=extra)
        if tracker.should_stop():
            break
    return i + 1, tracker.best().step - 1


def run_columns(curve: dict, subset: int | None) -> dict:
    cols = {"grad_norm": curve["hg_grad_norm"], "pred_change": curve.get("pred_change"),
            "label_agreement": curve.get("label_agreement")}
    if subset:
        cols["pred_subset"] = [float(subset)] * len(curve["hg_grad_norm"])
    return cols


def measure(evidence: dict, patience: int = DEFAULT_PATIENCE) -> list[dict]:
    """One row per run, rule and warm-up (and the run without early stopping)."""
    subsets = {m["name"]: m.get("pred_subset") for m in evidence.get("run_meta", [])}
    rows = []
    for name, curve in evidence["curves"].items():
        regime = evidence["per_run"][name]["regime"]
        acc = np.asarray(curve["test_acc"], dtype=float)
        best = int(np.nanargmax(acc))
        cols = run_columns(curve, subsets.get(name))
        for rule in RULES:
            settings = [("no early stopping", None, None)] + [(label, w, patience) for label, w, _ in WARMUPS]
            for label, warmup, stop_patience in settings:
                checks, chosen = replay(cols, rule, DEFAULT_WARMUP if warmup is None else warmup, stop_patience)
                rows.append({"run": name, "regime": regime, "noisy": is_noisy(regime), "rule": rule, "warmup": label,
                             "checks": checks, "chosen": chosen, "best": best,
                             "premature": checks - 1 < best - EARLY_BY,
                             "gap": 100 * float(acc[best] - acc[chosen])})
    return rows


def summarise(rows: list[dict]) -> dict:
    """{rule: {warm-up: {clean|noisy|all: {runs, premature, gap, gap_se, checks}}}}."""
    out: dict = {}
    for r in rows:
        for group in ("all", "noisy" if r["noisy"] else "clean"):
            out.setdefault(r["rule"], {}).setdefault(r["warmup"], {}).setdefault(group, []).append(r)
    for rule in out.values():
        for label, groups in rule.items():
            for group, rs in groups.items():
                gaps = np.array([r["gap"] for r in rs])
                groups[group] = {"runs": len(rs), "premature": float(np.mean([r["premature"] for r in rs])),
                                 "gap": float(gaps.mean()),
                                 "gap_se": float(gaps.std(ddof=1) / math.sqrt(len(gaps))) if len(gaps) > 1 else math.nan,
                                 "checks": float(np.mean([r["checks"] for r in rs]))}
    return out


def decide(summary: dict) -> dict:
    """The decision rule of the module docstring, applied to :func:`summarise`'s output."""
    ref = {rule: summary[rule]["no early stopping"] for rule in RULES}
    passes = {}
    for label, _, candidate in WARMUPS:
        ok = all(summary[rule][label]["clean"]["gap"] <= ref[rule]["clean"]["gap"] + CLEAN_TOLERANCE
                 and summary[rule][label]["noisy"]["gap"] <= ref[rule]["noisy"]["gap"] + NOISY_TOLERANCE
                 for rule in RULES)
        passes[label] = ok
    candidates = [(label, w) for label, w, candidate in WARMUPS if candidate]
    current = next(label for label, w in candidates if w == DEFAULT_WARMUP)
    default = summary[DEFAULT_RULE]
    passing = [(label, w) for label, w in candidates if passes[label]]
    if passing:
        label, w = passing[0]
        saving = default[current]["all"]["checks"] - default[label]["all"]["checks"]
        if label != current and saving < MIN_SAVING:
            label, w, why = current, DEFAULT_WARMUP, (
                f"{passing[0][0]} passes too but saves only {saving:.2f} checks per run against {current}, "
                f"under {MIN_SAVING}: keep {current}")
        else:
            why = f"{label} is the smallest warm-up that passes" + (
                f" and saves {saving:.2f} checks per run against {current}" if label != current else "")
    else:
        best_label, best_w = min(candidates, key=lambda c: default[c[0]]["clean"]["gap"])
        if default[best_label]["clean"]["gap"] < default[current]["clean"]["gap"]:
            label, w, why = best_label, best_w, "no warm-up passes; this one has the smallest clean gap"
        else:
            label, w, why = current, DEFAULT_WARMUP, "no warm-up passes, and none has a smaller clean gap than the current one"
    return {"passes": passes, "default": w, "default_label": label, "why": why,
            "reference": {rule: {g: ref[rule][g]["gap"] for g in ("clean", "noisy")} for rule in RULES}}


def table(summary: dict) -> str:
    lines = ["| rule | warm-up | clean: stopped > 3 checks before the best | clean: gap (points) | clean: checks of 30 "
             "| noisy: stopped > 3 checks before the best | noisy: gap (points) | noisy: checks of 30 |",
             "|---|---|---|---|---|---|---|---|"]
    for rule in RULES:
        for label in ["no early stopping"] + [w[0] for w in WARMUPS]:
            s = summary[rule][label]
            cells = []
            for group in ("clean", "noisy"):
                g = s[group]
                cells += [f"{100 * g['premature']:.0f} % ({round(g['premature'] * g['runs'])}/{g['runs']})",
                          f"{g['gap']:.2f} ± {g['gap_se']:.2f}", f"{g['checks']:.1f}"]
            lines.append(f"| {rule} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evidence", type=Path, default=EVIDENCE)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--patience", type=int, nargs="*", default=[5, 3],
                        help="shorter patiences to replay as well (reported, not used by the decision)")
    args = parser.parse_args(argv)
    evidence = json.loads(args.evidence.read_text())
    rows = measure(evidence)
    summary = summarise(rows)
    decision = decide(summary)
    others = {p: summarise(measure(evidence, p)) for p in args.patience}
    result = {
        "command": "python benchmarks/warmup.py",
        "generated": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "evidence": str(args.evidence.relative_to(ROOT) if args.evidence.is_relative_to(ROOT) else args.evidence),
        "settings": {"patience": DEFAULT_PATIENCE, "expected_checks": "the run's length (30)", "early_by": EARLY_BY,
                     "rules": list(RULES), "warmups": [w[0] for w in WARMUPS], "default_warmup_when_run": DEFAULT_WARMUP,
                     "tolerances": {"clean_points": CLEAN_TOLERANCE, "noisy_points": NOISY_TOLERANCE,
                                    "min_saving_checks": MIN_SAVING}},
        "summary": summary, "decision": decision, "per_run": rows,
        "other_patience": {str(p): o for p, o in others.items()},
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"patience {DEFAULT_PATIENCE} (the default)\n")
    print(table(summary))
    for p, o in others.items():
        print(f"\npatience {p} (not part of the decision)\n")
        print(table(o))
    print(f"\ndecision: DEFAULT_WARMUP = {decision['default']} ({decision['why']}); passes: {decision['passes']}")
    return result


if __name__ == "__main__":
    main()
