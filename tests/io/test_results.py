"""The results store: rows on disk as they come, one key per checkpoint, columns that may grow."""

from __future__ import annotations

import csv
import math

import pytest
import torch

import valfree
from valfree.io.results import (
    KEY_COLUMNS,
    STATUS_FAILED,
    STATUS_OK,
    ResultsStore,
    checkpoint_key,
    identity_columns,
    probe_row,
    read_scores,
)


def row(path, status=STATUS_OK, **extra):
    return {"step": 1, "path": path, "size": 10, "mtime": 1.5, "status": status, "error": "", **extra}


def on_disk(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_every_appended_row_is_on_disk_at_once_in_key_then_probe_column_order(tmp_path):
    out = tmp_path / "scores.csv"
    store = ResultsStore(out)
    store.append({"note": "x", **row("/a.pt", grad_norm=0.5)})
    assert on_disk(out) == [{"step": "1", "path": "/a.pt", "size": "10", "mtime": "1.5", "status": "ok", "error": "",
                             "grad_norm": "0.5", "note": "x"}]
    assert list(on_disk(out)[0])[: len(KEY_COLUMNS)] == list(KEY_COLUMNS)
    store.append(row("/b.pt", grad_norm=0.25))
    assert [r["path"] for r in on_disk(out)] == ["/a.pt", "/b.pt"]
    assert [r["path"] for r in ResultsStore(out).rows()] == ["/a.pt", "/b.pt"]  # a new reader sees both


def test_a_later_row_with_a_new_column_widens_the_file_and_keeps_the_old_rows(tmp_path):
    out = tmp_path / "scores.csv"
    store = ResultsStore(out)
    store.append(row("/a.pt", grad_norm=1.0))
    store.append(row("/b.pt", grad_norm=2.0, preset="segmentation"))
    rows = on_disk(out)
    assert rows[0]["preset"] == "" and rows[1]["preset"] == "segmentation"
    assert [r["grad_norm"] for r in rows] == ["1.0", "2.0"]
    assert not (tmp_path / "scores.csv.tmp").exists()


def test_done_keys_hold_successful_rows_only_and_a_retry_replaces_the_failed_row(tmp_path):
    out = tmp_path / "scores.csv"
    store = ResultsStore(out)
    store.append(row("/a.pt", grad_norm=1.0))
    store.append(row("/b.pt", status=STATUS_FAILED, error="corrupt"))
    assert store.done_keys() == {("/a.pt", "10", "1.500000")}
    store.append(row("/b.pt", grad_norm=3.0))  # the rerun that succeeds
    rows = ResultsStore(out).rows()
    assert [(r["path"], r["status"]) for r in rows] == [("/a.pt", "ok"), ("/b.pt", "ok")]
    assert len(ResultsStore(out).done_keys()) == 2


def test_the_key_ignores_how_the_mtime_was_written(tmp_path):
    a = ResultsStore.key({"path": "/a.pt", "size": 10, "mtime": 1.5})
    b = ResultsStore.key({"path": "/a.pt", "size": "10", "mtime": "1.500000"})
    assert a == b == ("/a.pt", "10", "1.500000")


def test_the_key_of_a_file_on_disk_is_the_key_of_the_row_written_for_it(tmp_path):
    ckpt = tmp_path / "step-5.pt"
    torch.save({"w": torch.zeros(3)}, ckpt)
    columns = identity_columns(ckpt)
    assert columns["path"] == str(ckpt.resolve()) and columns["size"] == ckpt.stat().st_size
    store = ResultsStore(tmp_path / "scores.csv")
    store.append({"step": 5, **columns, "status": STATUS_OK})
    assert checkpoint_key(ckpt) in ResultsStore(tmp_path / "scores.csv").done_keys()
    assert identity_columns(tmp_path / "not-saved.pt", missing_ok=True) == {
        "path": str(tmp_path / "not-saved.pt"), "size": "", "mtime": ""}


def test_cells_nan_and_lists_are_written_as_text(tmp_path):
    out = tmp_path / "scores.csv"
    ResultsStore(out).append(row("/a.pt", grad_norm=math.nan, warnings=["one", "two"]))
    assert on_disk(out)[0]["grad_norm"] == "nan"
    assert on_disk(out)[0]["warnings"] == "one; two"


def test_probe_row_stores_the_gram_or_direct_choice_apart_from_the_checkpoint_path():
    probe = valfree.head_gradient(torch.nn.Sequential(torch.nn.Linear(3, 2)), torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    cells = probe_row(probe)
    assert "path" not in cells and cells["path_used"] == probe.path
    assert cells["grad_norm"] == probe.grad_norm


def test_unreadable_missing_or_empty_files_are_one_clear_error(tmp_path):
    with pytest.raises(valfree.ValfreeError, match="does not exist; create it with 'valfree score"):
        read_scores(tmp_path / "missing.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(valfree.ValfreeError, match="holds no rows"):
        read_scores(tmp_path / "empty.csv")
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(valfree.ValfreeError, match="cannot read the results file"):
        ResultsStore(tmp_path / "binary.csv")
