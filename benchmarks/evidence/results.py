"""From the cache to one JSON results file: runs, selections, aggregates, TPV-on-trajectory analysis.

The markdown report is rendered from this JSON alone (``report.py``), so the numbers in the docs are
exactly the committed ones.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

import numpy as np
import torch

from valfree.selection import ema

from .config import CACHE, RunSpec
from .full_test import load_full_test, with_full_test
from .metrics import correlation_summary, evaluate_runs, summarise
from .probe_size import probe_size_summary
from .selectors import Run, all_selectors
from .signals import load_signals, merged_rows
from .carried import carried_runs
from .memorisation import attach_predictions, memorisation_results
from .trajectories import load_predictions, load_trajectory

CURVE_KEYS = ("test_acc", "test_loss", "train_loss", "train_acc", "val500_acc", "hg_grad_norm", "hg_score_w", "hg_score_z",
              "pseudo_grad_norm", "tpv_trace", "tpv_stderr", "ww_alpha", "hg_entropy",
              "pred_change", "label_agreement", "la_true", "memorised")


def collect(specs: list[RunSpec], cache: Path = CACHE) -> tuple[list[Run], list[dict], list[str]]:
    """Runs whose trajectory is cached (with whatever signals are), their metadata, and the missing ones."""
    runs, meta, missing = [], [], []
    for spec in specs:
        traj = load_trajectory(spec, cache)
        if traj is None:
            missing.append(spec.name)
            continue
        sig = load_signals(spec, cache)
        full = load_full_test(spec, cache)
        rows = with_full_test(merged_rows(traj, sig), full)
        run = Run(spec.name, spec.family.name, spec.regime.name, spec.seed, rows)
        pred = load_predictions(spec, cache)
        if pred is not None:
            attach_predictions(run, pred)
        runs.append(run)
        groups = (sig or {}).get("groups", {})
        meta.append({
            "name": spec.name, "params": traj["params"], "train_images": traj["train_images"],
            "test_images": full["test_images"] if full else traj["test_images"],
            "test_images_recorded": traj["test_images"], "total_steps": traj["total_steps"],
            "train_seconds": traj["train_seconds"], "eval_seconds": traj["eval_seconds"],
            "signal_seconds_per_checkpoint": {g: v["seconds_per_checkpoint"] for g, v in groups.items()},
            "signal_cpu_seconds_per_checkpoint": {g: v.get("cpu_seconds_per_checkpoint", float("nan")) for g, v in groups.items()},
            "cpu_seconds": traj.get("cpu_seconds", float("nan")), "checkpoints": len(traj["checkpoints"]),
            **({k: traj[k] for k in ("pred_seconds", "pred_cpu_seconds", "pred_subset")} if "pred_cpu_seconds" in traj else {}),
            "signal_status": {g: v["status"] if v["status"] == "ok" else f"failed: {v['error']}" for g, v in groups.items()},
        })
    return runs, meta, missing


def tpv_on_trajectories(runs: list[Run]) -> list[dict]:
    """Where Tr(H_eff) peaks and bottoms out along each run, next to where test accuracy peaks."""
    out = []
    for run in runs:
        tpv = run.series("tpv_trace")
        if not np.isfinite(tpv).all():
            continue
        acc, epochs = run.test_acc(), [r["epoch"] for r in run.rows]
        smooth = ema(tpv, 3)
        i_max, i_min, i_best = int(np.argmax(smooth)), int(np.argmin(smooth)), int(np.argmax(acc))
        out.append({
            "run": run.name, "family": run.family, "regime": run.regime, "seed": run.seed,
            "best_epoch": epochs[i_best], "best_acc": float(acc[i_best]), "last_acc": float(acc[-1]),
            "argmax_tpv_epoch": epochs[i_max], "argmax_tpv_acc": float(acc[i_max]),
            "argmin_tpv_epoch": epochs[i_min], "argmin_tpv_acc": float(acc[i_min]),
            "peak_drop": float(100 * (acc[i_best] - acc[-1])),
        })
    return out


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
        "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
    }


def build_results(grid_name: str, specs: list[RunSpec], command: str, cache: Path = CACHE, previous: dict | None = None) -> dict:
    """Everything the report shows. Runs missing from the cache but reported in ``previous`` (the
    committed JSON) are rebuilt from its curves (carried.py) instead of counted as missing."""
    runs, meta, missing = collect(specs, cache)
    carried, carried_meta, missing = carried_runs(previous, missing)
    runs, meta = runs + carried, meta + carried_meta
    if not runs:
        raise RuntimeError(f"no finished runs in {cache}; train the grid first")
    selectors = all_selectors(specs[0].val_sizes)
    expected = specs[0].checkpoints if len({s.checkpoints for s in specs}) == 1 else None
    per_run = evaluate_runs(runs, selectors, expected)
    summary = summarise(per_run, selectors)
    return {
        "grid": grid_name, "command": command,
        "generated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "sizes": {
            "families": {s.family.name: {"factory": s.family.factory, **s.family.kwargs, "optimizer": s.family.optimizer, "lr": s.family.lr} for s in specs},
            "regimes": {s.regime.name: s.regime.__dict__ for s in specs},
            "seeds": sorted({s.seed for s in specs}), "checkpoints": sorted({s.checkpoints for s in specs}),
            "test_images": sorted({m["test_images"] for m in meta}), "val_sizes": list(specs[0].val_sizes),
            "test_images_recorded": sorted({m["test_images_recorded"] for m in meta}),
            "probe_size": specs[0].probe_size, "batch_size": specs[0].batch_size,
        },
        "runs_expected": len(specs), "runs_finished": len(runs), "runs_missing": missing,
        "runs_carried": [r.name for r in carried],
        "selectors": [{"name": s.name, "label": s.label, "kind": s.kind} for s in selectors],
        "run_meta": meta,
        "curves": {r.name: {"epoch": [row["epoch"] for row in r.rows], **{k: r.series(k).tolist() for k in CURVE_KEYS}} for r in runs},
        "per_run": per_run,
        "summary": summary,
        "correlations": correlation_summary(per_run),
        "tpv_trajectory": tpv_on_trajectories(runs),
        "probe_size": probe_size_summary(runs, specs[0].probe_size),
        "memorisation": memorisation_results(runs, meta, {s.regime.name: s.regime.__dict__ for s in specs}),
    }


def write_results(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, allow_nan=True))
    os.replace(tmp, path)
