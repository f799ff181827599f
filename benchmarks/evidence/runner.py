"""Run a grid: train each run (cached), compute its signals (cached), in one or several processes.

Each worker process uses one torch thread: small models train faster as separate single-threaded
processes than as one process with two threads, and a single thread leaves the shared machine usable.
"""

from __future__ import annotations

import multiprocessing as mp
import time
import traceback
from pathlib import Path

import torch

from .config import CACHE, RunSpec
from .full_test import compute_full_test, load_full_test
from .signals import compute_signals, load_signals, spec_groups
from .trajectories import RunLocked, load_trajectory, run_lock, train_run


def _one(args) -> tuple[str, str]:
    spec, cache = args
    torch.set_num_threads(1)
    # One BLAS thread as well: scipy's SVD (WeightWatcher) with a thread pool per process thrashed on
    # the shared machine (measured 15 s against 0.8 s per MLP checkpoint with one thread).
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _train_and_score(spec, cache)


def _scored(spec: RunSpec, cache: Path) -> bool:
    record = load_signals(spec, cache)
    signals_done = record is not None and all(record["groups"].get(g, {}).get("status") == "ok" for g in spec_groups(spec))
    return signals_done and load_full_test(spec, cache) is not None


def _train_and_score(spec: RunSpec, cache: Path) -> tuple[str, str]:
    try:
        t0 = time.perf_counter()
        if load_trajectory(spec, cache) is not None and _scored(spec, cache):
            return spec.name, "ok (cached)"
        # One lock over training *and* scoring, so that parallel runners never duplicate either.
        with run_lock(spec, cache):
            train_run(spec, cache, locked=True)
            compute_signals(spec, cache)
            compute_full_test(spec, cache)
        return spec.name, f"ok ({time.perf_counter() - t0:.0f}s)"
    except RunLocked:
        return spec.name, "skipped: another runner holds it"
    except Exception:
        return spec.name, "FAILED\n" + traceback.format_exc()


def run_grid(specs: list[RunSpec], cache: Path = CACHE, workers: int = 1, log=None) -> list[str]:
    """Train and score every run; return the names of runs that failed (the others are cached).

    A worker that dies (killed for memory, say) fails the runs still queued instead of hanging the
    grid, as ``multiprocessing.Pool`` would; everything finished is cached, so a rerun resumes.
    """
    from concurrent.futures import ProcessPoolExecutor, as_completed

    log = log or (lambda msg: print(msg, flush=True))
    failed = []
    jobs = [(s, cache) for s in specs]
    if workers <= 1:
        for i, (name, status) in enumerate(map(_one, jobs), 1):
            log(f"[{i}/{len(jobs)}] {name}: {status}")
            if not status.startswith(("ok", "skipped")):
                failed.append(name)
        return failed
    # No max_tasks_per_child: with it, Python 3.11's executor can stop replacing exited workers and hang.
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {pool.submit(_one, job): job[0].name for job in jobs}
        for i, future in enumerate(as_completed(futures), 1):
            try:
                name, status = future.result()
            except Exception as exc:  # BrokenProcessPool: a worker died mid-run
                name, status = futures[future], f"FAILED: {type(exc).__name__}: {exc}"
            log(f"[{i}/{len(jobs)}] {name}: {status}")
            if not status.startswith(("ok", "skipped")):
                failed.append(name)
    return failed
