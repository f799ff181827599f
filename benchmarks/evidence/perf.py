"""Scoring a folder of checkpoints with the probe against a full labelled validation pass on each.

Both loops load every checkpoint of one cached run from disk, in the same process, interleaved over
``rounds`` repetitions so that machine load affects both alike; the ratio is taken within each round.
The probe path is ``valfree.io.scoring.score_checkpoints`` (what ``valfree score`` runs), on a fixed
batch of 256 training images; the validation pass is top-1 accuracy on all 10 000 test images.
"""

from __future__ import annotations

import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from valfree.io.checkpoints import load_into
from valfree.io.scoring import score_checkpoints

from .config import FAMILIES, RESULTS, cache_for
from .data import split_tensors
from .results import machine
from .trajectories import evaluate, write_json_atomic


def time_probe_folder(folder: Path, factory: str, data: str, batch_size: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        summary = score_checkpoints(str(folder), factory, data, Path(tmp) / "scores.csv", batch_size=batch_size, progress=False)
        seconds = time.perf_counter() - t0
    n = summary.scored if hasattr(summary, "scored") else len(list(folder.glob("*.pt")))
    return seconds, n


def time_validation_folder(folder: Path, model, x, y) -> tuple[float, int]:
    paths = sorted(folder.glob("step_*.pt"))
    t0 = time.perf_counter()
    for p in paths:
        load_into(model, p)
        evaluate(model, x, y)
    return time.perf_counter() - t0, len(paths)


def finished_folder(quick: bool) -> tuple[str, Path]:
    """The first finished clean run, preferring the convolutional families (the costly validation case)."""
    cache = cache_for("quick" if quick else "full")
    for family in ("cnn", "resnet", "vit", "mlp"):
        for seed in (0, 1, 2):
            folder = cache / f"{family}-clean-s{seed}"
            if (folder / "trajectory.json").exists():
                return family, folder
    raise RuntimeError(f"no finished clean run in {cache}; train the grid first")


def run_perf(quick: bool = False, log=print) -> dict:
    torch.set_num_threads(1)
    family, folder = finished_folder(quick)
    fam = FAMILIES[family]
    # A module:factory string the CLI path can import, with this family's benchmark sizes.
    factory = f"benchmarks.evidence.factories:{fam.name}"
    x, y = split_tensors("fashion-mnist", "test")
    model = fam.build(28)
    split_tensors("fashion-mnist", "train")  # warm the page cache of the IDX files, so neither loop pays first-read I/O
    # Every fifth checkpoint (6 of 30): enough for a rate; 10k-image passes over all 30 did not fit the
    # CPU budget of the shared machine.
    paths = sorted(folder.glob("step_*.pt"))[::5][: 3 if quick else 6]
    rounds = []
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / folder.name
        subset.mkdir()
        for p in paths:
            shutil.copy2(p, subset / p.name)
        for r in range(1 if quick else 2):
            probe_s, n_probe = time_probe_folder(subset, factory, "fashion-mnist", 256)
            val_s, n_val = time_validation_folder(subset, model, x, y)
            rounds.append(_round(probe_s, n_probe, val_s, n_val))
            log(f"perf round {r}: {rounds[-1]}")
    result = {
        "command": "python -m benchmarks.evidence perf" + (" --grid quick" if quick else ""),
        "machine": machine(), "torch_threads": 1, "family": fam.name, "folder": f"{folder.name} (every fifth checkpoint, {len(paths)})",
        "probe": "valfree.io.scoring.score_checkpoints, 256 training images, labels", "validation": f"top-1 on {len(x)} test images",
        "rounds": rounds,
        "median_ratio": statistics.median(r["ratio"] for r in rounds),
        "median_probe_ckpt_per_s": statistics.median(r["probe_ckpt_per_s"] for r in rounds),
        "median_validation_ckpt_per_s": statistics.median(r["validation_ckpt_per_s"] for r in rounds),
    }
    if not result["median_ratio"] > 0:
        raise AssertionError("the speed ratio is not positive")
    write_json_atomic(RESULTS / ("evidence_perf_quick.json" if quick else "evidence_perf.json"), result)
    return result


def _round(probe_s: float, n_probe: int, val_s: float, n_val: int) -> dict:
    if n_probe != n_val or n_val == 0:
        raise AssertionError(f"probe scored {n_probe} checkpoints but validation {n_val}")
    return {"probe_seconds": probe_s, "validation_seconds": val_s, "checkpoints": n_val,
            "probe_ckpt_per_s": n_probe / probe_s, "validation_ckpt_per_s": n_val / val_s, "ratio": val_s / probe_s}
