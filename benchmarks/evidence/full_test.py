"""Test accuracy on the whole test split, for evaluation only.

Training records each checkpoint's accuracy on the first ``spec.test_size`` test images (2000), which
carries about ±0.8 points of binomial noise at 85 %; the oracle then picks the luckiest checkpoint and
every gap inherits that noise. This pass evaluates each cached checkpoint on the *remaining* test
images and combines the counts, so the report's oracle and gaps use the whole split (10000 images
for Fashion-MNIST) without retraining. Nothing here is seen by a selector.
"""

from __future__ import annotations

from pathlib import Path

import torch

from valfree.io.checkpoints import load_into

from .config import CACHE, RunSpec
from .data import run_data, split_tensors
from .trajectories import evaluate, load_trajectory, read_record, run_dir, write_json_atomic

FULL_TEST_VERSION = 1


def load_full_test(spec: RunSpec, cache: Path = CACHE) -> dict | None:
    return read_record(run_dir(spec, cache) / "test_full.json", spec, version=FULL_TEST_VERSION)


@torch.no_grad()
def compute_full_test(spec: RunSpec, cache: Path = CACHE) -> dict:
    """Per checkpoint, accuracy and mean loss on the whole test split (cached in ``test_full.json``)."""
    record = load_full_test(spec, cache)
    if record is not None:
        return record
    traj = load_trajectory(spec, cache)
    if traj is None:
        raise RuntimeError(f"{spec.name}: no trajectory; train it first")
    x_all, y_all = split_tensors(spec.data, "test")
    head = traj["test_images"]
    x_rest, y_rest = x_all[head:], y_all[head:]
    model = spec.family.build(run_data(spec).in_size)
    rows = []
    for ck in traj["checkpoints"]:
        acc, loss = ck["test_acc"], ck["test_loss"]
        if len(x_rest):
            load_into(model, run_dir(spec, cache) / ck["path"])
            rest_acc, rest_loss = evaluate(model, x_rest, y_rest)
            n = head + len(x_rest)
            acc = (acc * head + rest_acc * len(x_rest)) / n
            loss = (loss * head + rest_loss * len(x_rest)) / n
        rows.append({"test_acc_full": acc, "test_loss_full": loss})
    record = {"key": spec.key(), "version": FULL_TEST_VERSION, "test_images": head + len(x_rest), "rows": rows}
    write_json_atomic(run_dir(spec, cache) / "test_full.json", record)
    return record


def with_full_test(rows: list[dict], record: dict | None) -> list[dict]:
    """``rows`` with ``test_acc``/``test_loss`` taken over the whole split when ``record`` has them; the
    values on the first images stay as ``test_acc_head``/``test_loss_head``."""
    if record is None:
        return rows
    out = []
    for row, full in zip(rows, record["rows"]):
        row = dict(row, test_acc_head=row["test_acc"], test_loss_head=row["test_loss"])
        row["test_acc"], row["test_loss"] = full["test_acc_full"], full["test_loss_full"]
        out.append(row)
    return out
