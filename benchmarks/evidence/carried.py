"""Runs reported before whose cached checkpoints are gone, rebuilt from the committed results JSON.

A grid of 96 runs takes hours on two cores, and the cache (checkpoints, signals, prediction matrices)
lives outside git. When a report is rebuilt on a machine whose cache holds only some runs, the other
runs are not retrained: their per-checkpoint series are in the committed JSON (``curves``), so every
selector that reads only those series (the probe presets, Tr(H_eff), WeightWatcher alpha, the 500-image
labelled set, the valfree rules on ``grad_norm``, ``pred_change``, ``label_agreement``) is
recomputed on them with the current code. What the curves do not hold is carried over as it was
reported: the choices of the 100- and 1000-image labelled sets and of the confidence, margin
selectors, the run's metadata and, for the noise diagnostic, the subset's true noise rate. The
prediction matrices are not in the JSON, so the studies that resample them (PC's standard error
against the subset size) cover the cached runs only, and say how many.
"""

from __future__ import annotations

import json
from pathlib import Path

from .selectors import Run
from .trajectories import checkpoint_steps


def load_previous(path: Path) -> dict | None:
    """The committed results JSON that is about to be rebuilt, or None."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def carried_run(previous: dict, name: str) -> tuple[Run, dict] | None:
    """The run ``name`` rebuilt from ``previous``'s curves, and its metadata; None if not reported there."""
    curves, rec = previous.get("curves", {}).get(name), previous.get("per_run", {}).get(name)
    meta = next((m for m in previous.get("run_meta", []) if m["name"] == name), None)
    if curves is None or rec is None or meta is None:
        return None
    n = len(curves["epoch"])
    steps = checkpoint_steps(int(meta["total_steps"]), n)
    if len(steps) != n:
        raise ValueError(f"{name}: {len(steps)} checkpoint steps for {n} reported checkpoints")
    for chosen in rec["chosen"].values():  # the reconstruction must reproduce every reported (index, step)
        if float(steps[chosen["index"]]) != float(chosen["step"]):
            raise ValueError(f"{name}: checkpoint {chosen['index']} was at step {chosen['step']}, reconstructed {steps[chosen['index']]}")
    subset = previous.get("memorisation", {}).get("subset", {}).get(name)
    keys = [k for k in curves if k != "epoch"]
    rows = []
    for i in range(n):
        row = {"step": float(steps[i]), "epoch": curves["epoch"][i], **{k: curves[k][i] for k in keys}}
        if subset:
            row["pred_subset"] = float(subset)
        rows.append(row)
    run = Run(name, rec["family"], rec["regime"], int(rec["seed"]), rows)
    run.carried = {
        "chosen": rec["chosen"],
        "noise": previous.get("memorisation", {}).get("noise", {}).get(name),
    }
    return run, meta


def carried_runs(previous: dict | None, names: list[str]) -> tuple[list[Run], list[dict], list[str]]:
    """(runs, their metadata, the names still missing) for the runs ``names`` absent from the cache."""
    runs, meta, missing = [], [], []
    for name in names:
        got = carried_run(previous, name) if previous else None
        if got is None:
            missing.append(name)
            continue
        runs.append(got[0])
        meta.append({**got[1], "carried": True})
    return runs, meta, missing
