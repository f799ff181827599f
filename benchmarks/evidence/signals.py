"""Label-free signals per checkpoint: a second pass over a run's saved checkpoints, cached as JSON.

Kept apart from training so that a signal can be added or recomputed (e.g. once an API lands)
without retraining. ``signals.json`` is keyed by the run's key and :data:`SIGNALS_VERSION`; each
group of signals (probe, held-out pseudo-label probe, TPV, WeightWatcher, the probe on smaller
batches) is cached on its own, so a
group that failed (for example a missing optional package) is retried on the next pass while the
others are reused.

Every signal reads only what a user without test labels has: the training images with the labels
the model was trained on, held-out *unlabeled* images, or the weights.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import torch

import valfree
from valfree.io.checkpoints import load_into

from .config import CACHE, RunSpec
from .data import run_data
from .probe_size import probe_size_signals
from .trajectories import load_trajectory, read_record, run_dir, write_json_atomic

SIGNALS_VERSION = 1
TPV_INPUTS = 64  # training images for Tr(H_eff); the same images and probe seeds for every checkpoint
TPV_PROBES = 4
PROBE_FIELDS = ("grad_norm", "score_w", "score_z", "loss", "entropy", "confidence", "margin")


def probe_signals(model, x, y) -> dict:
    """The head-gradient probe on the fixed training batch with its (possibly noisy) training labels."""
    r = valfree.head_gradient(model, x, y)
    return {f"hg_{k}": float(getattr(r, k)) for k in PROBE_FIELDS}


def pseudo_signals(model, x_unlabeled) -> dict:
    """The probe on held-out unlabeled images, with the model's own argmax as the target."""
    r = valfree.head_gradient(model, x_unlabeled, "pseudo")
    return {f"pseudo_{k}": float(getattr(r, k)) for k in PROBE_FIELDS if k != "loss"}


def tpv_signals(model, x_train) -> dict:
    """Tr(H_eff) of the logits on training inputs: isotropic TPV with sigma = 1 (valfree.tpv, trace)."""
    est = valfree.tpv(model, x_train, valfree.noise.Isotropic(1.0), method="trace", probes=TPV_PROBES, seed=0)
    return {"tpv_trace": float(est.value), "tpv_stderr": float(est.stderr)}


def weightwatcher_signals(model) -> dict:
    """WeightWatcher's layer-averaged power-law exponent alpha: data-free (smaller is 'better trained')."""
    import weightwatcher as ww  # optional: the bench extra
    from threadpoolctl import threadpool_limits

    for name in ("weightwatcher", "WW"):
        logging.getLogger(name).setLevel(logging.ERROR)
    watcher = ww.WeightWatcher(model=model, log_level=logging.ERROR)
    with threadpool_limits(1):  # scipy's SVD with a BLAS thread pool thrashes on a shared machine
        details = watcher.analyze(min_evals=0, plot=False)
    summary = watcher.get_summary(details)
    return {"ww_alpha": float(summary["alpha"]), "ww_alpha_weighted": float(summary["alpha_weighted"])}


GROUPS = {
    "probe": lambda model, d: probe_signals(model, d.x_probe, d.y_probe),
    "pseudo": lambda model, d: pseudo_signals(model, d.x_unlabeled),
    "tpv": lambda model, d: tpv_signals(model, d.x_probe[:TPV_INPUTS]),
    "ww": lambda model, d: weightwatcher_signals(model),
    "probe_size": lambda model, d: probe_size_signals(model, d.x_probe, d.y_probe),
}


def spec_groups(spec: RunSpec) -> tuple[str, ...]:
    """The signal groups computed for ``spec``: its ``signal_groups`` (those that exist), else all."""
    if spec.signal_groups is None:
        return tuple(GROUPS)
    return tuple(g for g in spec.signal_groups if g in GROUPS)


def load_signals(spec: RunSpec, cache: Path = CACHE) -> dict | None:
    return read_record(run_dir(spec, cache) / "signals.json", spec, version=SIGNALS_VERSION)


def compute_signals(spec: RunSpec, cache: Path = CACHE, groups=None, log=print) -> dict:
    """Compute (or reuse) every signal group for every checkpoint of a trained run."""
    groups = spec_groups(spec) if groups is None else groups
    traj = load_trajectory(spec, cache)
    if traj is None:
        raise RuntimeError(f"{spec.name}: no trajectory; train it first")
    record = load_signals(spec, cache) or {"key": spec.key(), "version": SIGNALS_VERSION, "groups": {}}
    todo = [g for g in groups if record["groups"].get(g, {}).get("status") != "ok"]
    if not todo:
        return record
    data = run_data(spec)
    model = spec.family.build(data.in_size)
    out = run_dir(spec, cache)
    for group in todo:
        fn = GROUPS[group]
        rows, seconds, cpu, status, error = [], [], [], "ok", ""
        for ck in traj["checkpoints"]:
            load_into(model, out / ck["path"])
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                with torch.no_grad() if group in ("probe", "pseudo", "probe_size") else _null():
                    rows.append(fn(model, data))
            except Exception as exc:  # record and move on: the other groups are still useful
                status, error = "failed", f"{type(exc).__name__}: {exc}"
                break
            seconds.append(time.perf_counter() - t0)
            cpu.append(time.process_time() - c0)  # CPU time: robust to the load of a shared machine
        record["groups"][group] = {
            "status": status, "error": error, "rows": rows if status == "ok" else [],
            "seconds_per_checkpoint": (sum(seconds) / len(seconds)) if seconds else math.nan,
            "cpu_seconds_per_checkpoint": (sum(cpu) / len(cpu)) if cpu else math.nan,
        }
        if status != "ok":
            log(f"{spec.name}: signal group {group!r} failed: {error}")
        write_json_atomic(out / "signals.json", record)
    return record


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def merged_rows(traj: dict, signals: dict | None) -> list[dict]:
    """One dict per checkpoint: the trajectory's metrics plus every signal that was computed."""
    rows = [dict(r) for r in traj["checkpoints"]]
    for group in (signals or {}).get("groups", {}).values():
        if group["status"] != "ok":
            continue
        for row, extra in zip(rows, group["rows"]):
            row.update(extra)
    return rows
