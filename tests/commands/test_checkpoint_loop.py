"""The loop over checkpoints that score and tpv share, driven by a measurement of its own."""

from __future__ import annotations

import torch

from valfree.commands.checkpoint_loop import CheckpointLoop, RunSummary, failure_message
from valfree.errors import ValfreeError
from valfree.io.checkpoints import discover_checkpoints
from valfree.io.results import ResultsStore


def folder_of_checkpoints(folder, steps=(10, 20, 30)):
    folder.mkdir()
    for step in steps:
        torch.save({"w": torch.full((2,), float(step))}, folder / f"step-{step}.pt")
    return discover_checkpoints(str(folder))[0]


def test_any_measurement_gets_rows_failures_and_resume(tmp_path):
    refs = folder_of_checkpoints(tmp_path / "ckpts")
    out = tmp_path / "changes.csv"

    def measure(ref):
        if ref.step == 20:
            raise RuntimeError("weights do not fit\nsecond line")
        return {"changed": ref.step / 100}

    summary = CheckpointLoop(refs, ResultsStore(out), RunSummary(out=str(out), verb="measured")).run(
        measure, columns=lambda ref: {"subset": "s0"}, progress=False)
    assert (summary.scored, summary.failed, summary.skipped) == (2, 1, 0)
    rows = ResultsStore(out).rows()
    assert [(r["step"], r["status"], r["subset"]) for r in rows] == [("10", "ok", "s0"), ("20", "failed", "s0"),
                                                                      ("30", "ok", "s0")]
    assert rows[1]["error"] == "RuntimeError: weights do not fit"
    assert summary.describe().splitlines() == [
        f"measured 2, skipped 0 already in {out}, failed 1",
        f"  failed: {rows[1]['path']}: RuntimeError: weights do not fit",
    ]
    # A rerun skips what succeeded and retries the failure, replacing its row.
    again = CheckpointLoop(refs, ResultsStore(out), RunSummary(out=str(out)))
    assert [ref.step for ref in again.todo] == [20] and again.summary.skipped == 2
    again.run(lambda ref: {"changed": 0.2}, progress=False)
    assert [r["status"] for r in ResultsStore(out).rows()] == ["ok", "ok", "ok"]


def test_failure_messages_are_one_line():
    assert failure_message(ValfreeError("the file is corrupt.")) == "the file is corrupt."
    assert failure_message(KeyError()) == "KeyError"
    assert failure_message(ValueError("x" * 500)) == "ValueError: " + "x" * 300
