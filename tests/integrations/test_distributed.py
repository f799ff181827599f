"""torch.distributed: the probe of the global batch, identical decisions on every rank, split scoring.

Two gloo ranks on CPU are spawned per test; each test rebuilds the union of the ranks' batches in this
process and compares with the single-process probe on it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from valfree import head_gradient, head_gradient_from_features
from valfree.cli import main as cli_main
from valfree.errors import ValfreeError
from valfree.io.results import ResultsStore

from .ddp_workers import (
    FEATURE_CASES,
    FOCAL_PSEUDO_CASES,
    TINY_MLP,
    all_scenarios_worker,
    dense_head_case,
    feature_case,
    focal_pseudo_case,
    focal_pseudo_worker,
    run_ranks,
    train_with_monitors,
    training_case,
)

NUMERIC = ("grad_norm", "score_w", "score_z", "bias_grad_norm", "loss", "entropy", "confidence", "margin",
           "weight_norm", "feature_rms")
ROOT = Path(__file__).resolve().parents[2]


def assert_same_probe(got: dict, want: dict, rel: float = 1e-9) -> None:
    for key in NUMERIC:
        assert got[key] == pytest.approx(want[key], rel=rel, abs=1e-12), key
    assert got["batch_size"] == want["batch_size"]
    assert got["warnings"] == want["warnings"]


@pytest.fixture(scope="module")
def ranks_output(tmp_path_factory):
    """One run of two gloo ranks that plays every scenario; the tests below check its outputs."""
    out = tmp_path_factory.mktemp("ddp")
    make_checkpoints(out / "ckpts", out / "data.npz")
    run_ranks(all_scenarios_worker, str(out), str(out / "ckpts"), f"npz:{out / 'data.npz'}")
    return out


def test_global_probe_equals_the_single_process_probe_on_the_union(ranks_output):
    ranks = [torch.load(ranks_output / f"rank{r}.pt") for r in range(2)]
    errors = [r.pop("bad_label_error") for r in ranks]
    assert ranks[0] == ranks[1]  # every rank holds the very same numbers
    for name in FEATURE_CASES:
        sizes, z, a, t, w, b, options = feature_case(name)
        want = head_gradient_from_features(z, a, t, w, b, **options).as_dict()
        got = ranks[0][name]
        assert_same_probe(got, want)
        expected_path = "all_reduce" if name.startswith(("reduce", "single")) else "all_gather+"
        assert got["path"].startswith(expected_path), (name, got["path"])
    assert "single class" in ranks[0]["single_class"]["warnings"]
    model, x, y = dense_head_case()
    assert_same_probe(ranks[0]["dense_head_model"], head_gradient(model, x, y).as_dict())
    # A bad label on one rank is an error on every rank, not a hang of the healthy one.
    assert "labels must lie in [0, 3]" in errors[1]
    assert "rank 1 could not compute the probe" in errors[0]


def test_focal_pseudo_targets_are_the_single_process_ones_on_every_rank(tmp_path):
    """Pseudo-targets of a focal (sigmoid) heatmap head are sigmoid(A).round() on the DDP path as in one
    process, and focal's normaliser (the count of positives in the whole batch) is kept exactly."""
    run_ranks(focal_pseudo_worker, str(tmp_path))
    ranks = [torch.load(tmp_path / f"focal_rank{r}.pt") for r in range(2)]
    assert ranks[0] == ranks[1]
    for name in FOCAL_PSEUDO_CASES:
        _, z, a, w, b = focal_pseudo_case(name)
        want = head_gradient_from_features(z, a, "pseudo", w, b, loss="focal").as_dict()
        assert "error" not in ranks[0][name], ranks[0][name]
        assert_same_probe(ranks[0][name], want)


def test_ddp_training_gives_the_single_process_scores_and_decisions(ranks_output, tmp_path):
    """DDP on 2 ranks (each its half of the batch) against one process on the whole batch, both Monitor modes."""
    logs = [torch.load(ranks_output / "ddp" / f"rank{r}" / "log.pt") for r in range(2)]
    assert logs[0] == logs[1]
    single = train_with_monitors(*training_case(), str(tmp_path / "single"))
    assert [e["step"] for e in logs[0]] == [e["step"] for e in single]
    for got, want in zip(logs[0], single):
        assert_same_probe(got["fixed"], want["fixed"], rel=1e-8)
        assert_same_probe(got["piggy"], want["piggy"], rel=1e-8)
        for key in ("fixed_stop", "piggy_stop", "fixed_best", "piggy_best", "fixed_kept", "piggy_kept"):
            assert got[key] == want[key], (got["step"], key)
    assert any(e["piggy_stop"] or e["fixed_stop"] for e in single), "the run should reach the stopping rule"
    for mode in ("fixed", "piggy"):
        # Rank 0 alone wrote files: the kept checkpoints and one results row per probe.
        on_disk = sorted(p.name for p in (ranks_output / "ddp" / mode).iterdir())
        assert on_disk == sorted(logs[0][-1][f"{mode}_kept"])
        rows = ResultsStore(ranks_output / "ddp" / f"{mode}.csv").rows()
        want_rows = ResultsStore(tmp_path / "single" / f"{mode}.csv").rows()
        assert [r["step"] for r in rows] == [r["step"] for r in want_rows]
        for r, s in zip(rows, want_rows):
            assert float(r["grad_norm"]) == pytest.approx(float(s["grad_norm"]), rel=1e-8)


def test_ddp_ranks_shard_the_prediction_subset_and_decide_by_the_rule_alike(ranks_output):
    """Each rank predicts half of the seeded subset; the summed counts give the single-process columns,
    so both ranks stop at the same check and choose the same checkpoint as one process does."""
    from .ddp_workers import run_rule

    ranks = [torch.load(ranks_output / "rule" / f"rank{r}.pt") for r in range(2)]
    single = run_rule()
    assert repr(ranks[0]) == repr(ranks[1])
    assert len(ranks[0]) == len(single) and ranks[0][-1]["stop"]
    for got, want in zip(ranks[0], single):
        for key in ("pred_change", "label_agreement", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-6, nan_ok=True), (got["step"], key)  # float32 sums
        assert (got["pred_subset"], got["stop"], got["best"]) == (want["pred_subset"], want["stop"], want["best"])


def test_lightning_ddp_ranks_record_the_global_probe_and_decide_alike(ranks_output):
    """Lightning's DDP strategy on the two ranks: identical callback state on both, stopping by the rule,
    and the recorded score is the probe of the whole fixed batch although each rank probed half of it."""
    import json

    from .lightning_models import Classifier
    from .test_lightning import NOISE
    from .test_monitor import blobs, reference_stop_step

    folder = ranks_output / "lightning"
    ranks = [json.loads((folder / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]
    state = ranks[0]
    assert state["should_stop"] and state["global_step"] < 200
    assert state["LabelFreeEarlyStopping"]["stopped_step"] == state["global_step"]
    tracker = state["LabelFreeCheckpoint"]["tracker"]
    assert reference_stop_step(tracker["steps"], tracker["values"], patience=2, min_delta=0.02, span=3) == state["global_step"]
    kept = sorted(tracker["paths"][int(i)] for i in tracker["kept"])  # JSON made the indices strings
    assert sorted(str(p) for p in (folder / "ckpt").iterdir()) == kept
    assert state["LabelFreeCheckpoint"]["best_model_path"] in kept
    probe = blobs(64, seed=7, noise=NOISE)
    for path in kept:
        model = Classifier()
        model.load_state_dict(torch.load(path, weights_only=True)["state_dict"])
        recorded = tracker["values"][tracker["paths"].index(path)]
        assert head_gradient(model, *probe).grad_norm == pytest.approx(recorded, rel=1e-5)


def make_checkpoints(folder: Path, data: Path, count: int = 5) -> None:
    from valfree.io.factory import build_model

    folder.mkdir()
    torch.manual_seed(0)
    for step in range(1, count + 1):
        torch.save(build_model(TINY_MLP).state_dict(), folder / f"step-{step * 10}.pt")
    g = np.random.default_rng(0)
    np.savez(data, x=g.standard_normal((64, 1, 4, 4)).astype(np.float32), y=g.integers(0, 3, 64))


def test_split_scoring_merges_to_the_single_process_file(ranks_output, tmp_path):
    from valfree.commands.score import score_checkpoints

    score_checkpoints(str(ranks_output / "ckpts"), TINY_MLP, f"npz:{ranks_output / 'data.npz'}",
                      out=tmp_path / "single.csv", batch_size=32, progress=False)
    assert (ranks_output / "split.csv").read_text() == (tmp_path / "single.csv").read_text()
    assert not list(ranks_output.glob("*.part"))


def test_leftover_parts_of_an_interrupted_run_are_merged_not_lost(tmp_path):
    from valfree.commands.score_torchrun import part_path, torchrun_scoring

    out = tmp_path / "scores.csv"
    ResultsStore(part_path(out, 1)).append({"step": 20, "path": "/b.pt", "size": 1, "mtime": "1.000000", "status": "ok", "grad_norm": 2.0})
    ResultsStore(part_path(out, 0)).append({"step": 10, "path": "/a.pt", "size": 1, "mtime": "1.000000", "status": "ok", "grad_norm": 1.0})
    with torchrun_scoring(out) as run:
        assert (run.rank, run.world, run.part) == (0, 1, out)
    assert [r["step"] for r in ResultsStore(out).rows()] == ["10", "20"]
    assert not list(tmp_path.glob("*.part"))


def test_torchrun_score_writes_the_same_csv_as_one_process(tmp_path):
    """A resumed run: one checkpoint is already scored, the other three are split across two ranks."""
    folder, data = tmp_path / "ckpts", tmp_path / "data.npz"
    make_checkpoints(folder, data, count=4)
    common = ["--model", TINY_MLP, "--data", f"npz:{data}", "--batch-size", "32"]
    assert cli_main(["score", str(folder / "step-10.pt"), *common, "--out", str(tmp_path / "one.csv")]) == 0
    # the resumed output as `valfree score` left it: the CSV, its database and its prediction sidecar
    shutil.copy(tmp_path / "one.csv", tmp_path / "two.csv")
    shutil.copy(tmp_path / "one.csv.db", tmp_path / "two.csv.db")
    shutil.copytree(tmp_path / "one.csv.predictions", tmp_path / "two.csv.predictions")
    assert cli_main(["score", str(folder), *common, "--out", str(tmp_path / "one.csv")]) == 0
    loads = tmp_path / "loads.txt"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "VALFREE_TEST_LOAD_LOG": str(loads)}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "valfree", "score", str(folder), *common, "--out", str(tmp_path / "two.csv")],
        env=env, capture_output=True, text=True, timeout=180,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    # Each of the three new checkpoints was scored once, and both ranks took a share.
    assert sorted(loads.read_text().split()) == ["0", "0", "1"]
    assert (tmp_path / "two.csv").read_text() == (tmp_path / "one.csv").read_text()
    assert len(ResultsStore(tmp_path / "two.csv").rows()) == 4
    assert not list(tmp_path.glob("*.part"))


def test_without_a_process_group_the_distributed_probe_is_the_local_probe():
    from valfree.integrations.distributed import distributed_head_gradient, is_distributed

    assert not is_distributed()
    model, x, y = dense_head_case()
    assert distributed_head_gradient(model, x, y).as_dict() == head_gradient(model, x, y).as_dict()


def test_bad_targets_are_a_clear_error_without_a_process_group():
    from valfree.integrations.distributed import distributed_head_gradient_from_features

    with pytest.raises(ValfreeError, match="labels must lie in"):
        distributed_head_gradient_from_features(torch.randn(4, 3), torch.randn(4, 2), torch.tensor([0, 1, 2, 5]),
                                                torch.randn(2, 3))


def test_a_head_called_twice_is_refused_by_the_distributed_probe_as_by_the_local_one():
    from valfree.integrations.distributed import distributed_head_gradient

    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body, self.fc = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

        def forward(self, x):
            h = self.body(x)
            return self.fc(h) + self.fc(2 * h)

    model, x, y = Shared(), torch.randn(6, 3), torch.tensor([0, 1, 0, 1, 0, 1])
    for probe in (head_gradient, distributed_head_gradient):
        with pytest.raises(ValfreeError, match="called 2 times"):
            probe(model, x, y)
