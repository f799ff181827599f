"""`valfree score` records predicted classes on a training subset: label agreement per row, and
prediction changes in step order however the rows were scored."""

from __future__ import annotations

import csv
import math
import shutil

import numpy as np
import pytest
import torch

from valfree.cli import main
from valfree.io.checkpoints import load_into
from valfree.io.data import load_dataset, probe_batch, seeded_indices
from valfree.io.predictions import PredictionSidecar
from valfree.models import digits_cnn

MODEL = "valfree.models:digits_cnn"
SUBSET = 600


def rows(path):
    with open(path, newline="") as fh:
        return sorted(csv.DictReader(fh), key=lambda r: int(r["step"]))


def score(folder, out, *extra):
    return main(["score", str(folder), "--model", MODEL, "--data", "digits", "--out", str(out),
                 "--pred-subset", str(SUBSET), *extra])


def test_columns_equal_a_direct_computation(run_dir, tmp_path):
    out = tmp_path / "scores.csv"
    assert score(run_dir, out) == 0
    table = rows(out)
    dataset = load_dataset("digits")
    x, y = probe_batch(dataset, SUBSET, 0)  # the subset: the same seeded draw, cut at SUBSET
    preds = []
    for r in table:
        model = load_into(digits_cnn(), r["path"]).eval()
        with torch.no_grad():
            preds.append(model(x).argmax(1).numpy())
    for i, r in enumerate(table):
        assert int(r["pred_subset"]) == SUBSET
        assert float(r["label_agreement"]) == pytest.approx(float(np.mean(preds[i] == y.numpy())), abs=1e-12)
        if i == 0:
            assert math.isnan(float(r["pred_change"]))
        else:
            assert float(r["pred_change"]) == pytest.approx(float(np.mean(preds[i] != preds[i - 1])), abs=1e-12)
    # the probe batch is part of the subset, and the probe is the one of a plain score run
    probe_idx, subset_idx = seeded_indices(dataset, 256, 0), seeded_indices(dataset, SUBSET, 0)
    assert set(probe_idx.tolist()) <= set(subset_idx.tolist())
    assert main(["score", str(run_dir), "--model", MODEL, "--data", "digits", "--out", str(tmp_path / "plain.csv"),
                 "--pred-subset", "0"]) == 0
    plain = rows(tmp_path / "plain.csv")
    assert [r["grad_norm"] for r in plain] == [r["grad_norm"] for r in table]
    assert "pred_change" not in plain[0]


def test_resume_added_later_and_out_of_order_give_the_same_columns(run_dir, tmp_path):
    whole = tmp_path / "whole.csv"
    assert score(run_dir, whole) == 0
    files = sorted(run_dir.glob("step_*.pt"))
    # out of order: the odd checkpoints first, then everything (the even ones are added later)
    part = tmp_path / "part"
    part.mkdir()
    for f in files[1::2]:
        shutil.copy2(f, part / f.name)
    out = tmp_path / "pieces.csv"
    assert score(part, out) == 0
    for f in files[0::2]:
        shutil.copy2(f, part / f.name)
    assert score(part, out) == 0
    got, want = rows(out), rows(whole)
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for column in ("pred_change", "label_agreement", "grad_norm"):
        assert [r[column] for r in got] == [r[column] for r in want], column


def test_other_settings_are_refused_and_the_sidecar_keeps_its_subset(run_dir, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert score(run_dir, out) == 0
    capsys.readouterr()
    assert score(run_dir, out, "--seed", "1") == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "seed" in err and "another --out" in err
    assert PredictionSidecar(out).meta()["size"] == SUBSET
