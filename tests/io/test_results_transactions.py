"""The results store under concurrency, crashes, other settings and odd file names."""

from __future__ import annotations

import csv
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from valfree.errors import ValfreeError
from valfree.io.results import ResultsStore

ROOT = Path(__file__).resolve().parents[2]


def _row(i: int, status: str = "ok", **extra) -> dict:
    return {"step": i, "path": f"/ckpt/step_{i}.pt", "size": 100 + i, "mtime": f"{1000 + i:.6f}", "status": status,
            "error": "" if status == "ok" else "boom", "grad_norm": 0.5 / (i + 1), **extra}


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def test_round_trip_and_a_wider_header(tmp_path):
    out = tmp_path / "scores.csv"
    store = ResultsStore(out)
    store.append(_row(1))
    store.append(_row(2, extra_col="x"))
    rows = _csv_rows(out)
    assert [r["step"] for r in rows] == ["1", "2"] and rows[0]["extra_col"] == "" and rows[1]["extra_col"] == "x"
    assert ResultsStore(out).done_keys() == {ResultsStore.key(r) for r in rows}


def test_a_failure_never_replaces_a_result_but_a_result_replaces_a_failure(tmp_path):
    out = tmp_path / "scores.csv"
    store = ResultsStore(out)
    store.append(_row(1))
    assert store.append(_row(1, status="failed")) is False
    store.append(_row(2, status="failed"))
    store.append(_row(2))
    rows = _csv_rows(out)
    assert [(r["step"], r["status"]) for r in rows] == [("1", "ok"), ("2", "ok")]


def _writer(out: str, start: int, stop: int, status: str) -> None:
    store = ResultsStore(out)
    for i in range(start, stop):
        store.append(_row(i, status=status))


def test_two_writers_on_the_same_checkpoints_neither_duplicate_nor_lose(tmp_path):
    out = str(tmp_path / "scores.csv")
    ctx = mp.get_context("spawn")
    # one writer records results, the other stale failures for the same keys, interleaved
    procs = [ctx.Process(target=_writer, args=(out, 0, 40, "ok")), ctx.Process(target=_writer, args=(out, 0, 40, "failed")),
             ctx.Process(target=_writer, args=(out, 20, 60, "ok"))]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = _csv_rows(Path(out))
    keys = [ResultsStore.key(r) for r in rows]
    assert len(keys) == len(set(keys)) == 60
    assert all(r["status"] == "ok" for r in rows)
    assert ResultsStore(out).rows() == ResultsStore(out).rows()  # the CSV re-read equals the database


KILL_SCRIPT = """
import sys
from valfree.io.results import ResultsStore
store = ResultsStore(sys.argv[1])
i = 0
while True:
    store.append({"step": i, "path": f"/c/{i}.pt", "size": i, "mtime": "1.000000", "status": "ok", "error": "", "grad_norm": i * 0.1})
    i += 1
"""


@pytest.mark.parametrize("delay", [0.3, 0.7, 1.1])
def test_a_killed_writer_leaves_whole_rows_and_the_rerun_resumes(tmp_path, delay):
    out = tmp_path / "scores.csv"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(out)], env=env)
    deadline = time.time() + 60
    while not out.exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    text = out.read_text()
    assert text.endswith("\n")
    rows = _csv_rows(out)
    assert rows and all(r["status"] == "ok" and r["grad_norm"] for r in rows)
    store = ResultsStore(out)
    # The CSV line is written inside the row's transaction, so a kill between the two leaves the CSV
    # one row ahead of the database; reopening re-exports it from the database, the truth.
    assert abs(len(store.rows()) - len(rows)) <= 1
    assert len(_csv_rows(out)) == len(store.rows())
    store.append({"step": 10**6, "path": "/c/new.pt", "size": 1, "mtime": "1.000000", "status": "ok", "error": ""})
    again = _csv_rows(out)
    assert len(again) == len(store.rows()) and len({ResultsStore.key(r) for r in again}) == len(again)


def test_other_settings_are_refused_in_one_sentence(tmp_path):
    out = tmp_path / "scores.csv"
    ResultsStore(out, settings={"data": "digits", "seed": 0}).append(_row(1))
    ResultsStore(out, settings={"data": "digits", "seed": 0})  # the same settings continue
    with pytest.raises(ValfreeError, match=r"other settings \(seed 0 there, 1 now\).*another --out") as info:
        ResultsStore(out, settings={"data": "digits", "seed": 1})
    assert "\n" not in str(info.value)


def test_non_utf8_file_names_round_trip(tmp_path):
    out = tmp_path / "scores.csv"
    name = b"/ckpt/\xff\xfe-step_3.pt".decode("utf-8", "surrogateescape")
    ResultsStore(out).append({**_row(3), "path": name})
    assert ResultsStore(out).rows()[0]["path"] == name
    assert _csv_rows(out)[0]["path"] == name


def test_an_old_csv_is_imported_and_a_cut_last_line_dropped(tmp_path):
    out = tmp_path / "scores.csv"
    out.write_text("step,path,size,mtime,status,error,grad_norm\n1,/a.pt,1,1.000000,ok,,0.5\n2,/b.pt,2,2.000000,ok,,0.2")
    store = ResultsStore(out)
    assert [r["path"] for r in store.rows()] == ["/a.pt"]
    assert out.read_text().endswith("\n")


def test_removing_the_csv_starts_afresh(tmp_path):
    out = tmp_path / "scores.csv"
    ResultsStore(out).append(_row(1))
    out.unlink()
    assert ResultsStore(out).rows() == []


def test_a_folder_or_garbage_is_one_sentence(tmp_path):
    with pytest.raises(ValfreeError, match="is a folder"):
        ResultsStore(tmp_path)
    bad = tmp_path / "x.csv"
    bad.write_bytes(b"\x00\x01garbage")
    with pytest.raises(ValfreeError, match="cannot read the results file.*binary data"):
        ResultsStore(bad)
