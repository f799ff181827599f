"""The results store: one row per scored checkpoint, in SQLite, exported as the CSV people read.

A row is keyed by the checkpoint's (path, size, mtime): a rerun skips keys already scored
successfully and retries failed ones. ``valfree score``, ``valfree tpv``, the Monitor and the training
callbacks all write through :class:`ResultsStore`, so that ``valfree select`` and ``valfree report``
read any of their files.

The guarantees come from :mod:`valfree.io.results_db`: each row is one SQLite transaction, and the
CSV is written while that transaction holds the write lock, either as one appended line (a new key
with no new column, after a complete last line) or as a whole new file renamed over the old one. So
concurrent writers never duplicate or lose a row, a failure never replaces a result, a killed writer
leaves at worst a cut last line that the next writer repairs and every reader skips, and a run with
other settings (``settings=``) is refused instead of mixed in.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Iterable

from ..errors import ValfreeError
from .checkpoints import file_identity
from .results_db import ResultsDB, db_path, read_csv_rows

# Leading columns, in this order; probe fields follow, then anything else a writer adds.
KEY_COLUMNS = ("step", "path", "size", "mtime", "status", "error")
PROBE_COLUMNS = (
    "grad_norm", "score_w", "score_z", "bias_grad_norm", "loss", "entropy", "confidence", "margin",
    "batch_size", "weight_norm", "feature_rms", "path_used", "warnings",
)
STATUS_OK, STATUS_FAILED = "ok", "failed"
# NaN or infinite weights or scores: neither a result nor a broken file, and never taken for either.
STATUS_NONFINITE = "nonfinite"


def merge_columns(columns: list[str], rows: Iterable[dict]) -> list[str]:
    """The CSV header: ``columns`` plus any new keys of ``rows``, key and probe columns first."""
    seen = list(columns)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.append(key)
    ordered = [c for c in KEY_COLUMNS + PROBE_COLUMNS if c in seen]
    return ordered + [c for c in seen if c not in ordered]


class ResultsStore:
    """Per-checkpoint results: transactional rows in ``<path>.db``, exported to the CSV ``path``.

    ``settings`` (data spec, probe batch hash, seed, loss, ...: whatever describes how the rows were
    measured) are recorded with the store and checked on every later open; a run with other settings
    is refused in one sentence. Rows may carry columns that earlier rows lack; the CSV's header is the
    union. A CSV from before the database is imported on first open; a CSV the user removed starts a
    fresh store.
    """

    def __init__(self, path: str | os.PathLike, settings: dict | None = None):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValfreeError(f"{str(self.path)!r} is a folder; pass a file name for the results, e.g. {str(self.path / 'scores.csv')!r}.")
        self.db = ResultsDB(self.path)
        with self.db.write() as conn:
            if self.db.fresh and self.path.exists():
                for row in read_csv_rows(self.path):  # a CSV written before the database: import it
                    self.db.upsert(conn, _key_text(self.key(row)), row, row.get("status", STATUS_OK) == STATUS_OK)
            elif not self.path.exists() and self.db.count(conn):
                self.db.clear(conn)  # the user removed the CSV to start again
            if settings is not None:
                self.db.check_settings(conn, settings, repr(str(self.path)))
            if self.db.count(conn) and not self._csv_matches(conn):
                self._export(conn)

    # -- reading ---------------------------------------------------------------------------------
    def rows(self) -> list[dict]:
        """Every row, in the order they were first written (other writers' rows included), as the CSV
        shows them: every column of the header, in its order, empty where a row has no value."""
        rows = self.db.rows(self.db.conn)
        header = merge_columns([], rows)
        return [{c: r.get(c, "") for c in header} for r in rows]

    @staticmethod
    def key(row: dict) -> tuple[str, str, str]:
        """The key of a row: (path, size, mtime) as text, the mtime with six decimals whatever a writer
        wrote, so that a key built from a file on disk equals the key read back from its row."""
        return str(row.get("path", "")), str(row.get("size", "")), _fmt_mtime(row.get("mtime", ""))

    def done_keys(self) -> set[tuple[str, str, str]]:
        """Keys of the rows scored successfully, as the store holds them now."""
        return {self.key(r) for r in self.rows() if r.get("status", STATUS_OK) == STATUS_OK}

    def settings(self) -> dict | None:
        return self.db.settings()

    # -- writing ---------------------------------------------------------------------------------
    def append(self, row: dict) -> bool:
        """Add one row, or replace the row with the same key (a failure never replaces a result), and
        bring the CSV up to date, in one transaction. Returns whether the row was written."""
        row = {k: _cell(v) for k, v in row.items()}
        ok = row.get("status", STATUS_OK) == STATUS_OK
        with self.db.write() as conn:
            written, replaced = self.db.upsert(conn, _key_text(self.key(row)), row, ok)
            if not written:
                return False
            header = self.db.columns(conn)
            if replaced or header is None or merge_columns(header, [row]) != header or not self._ends_whole():
                self._export(conn)
            else:
                self._append_line(header, row)
        return True

    def update_columns(self, updates: dict[tuple, dict]) -> None:
        """Set columns of existing rows by key (e.g. values that depend on their neighbours), in one
        transaction; keys not in the store are ignored."""
        with self.db.write() as conn:
            changed = False
            for key, values in updates.items():
                found = self.db.get(conn, _key_text(key))
                if found is None:
                    continue
                row, ok = found
                row.update({k: _cell(v) for k, v in values.items()})
                self.db.upsert(conn, _key_text(key), row, ok, force=True)
                changed = True
            if changed:
                self._export(conn)

    def _export(self, conn) -> None:
        rows = self.db.rows(conn)
        header = merge_columns([], rows)
        self.db.export(header, rows)
        self.db.set_columns(conn, header)

    def _csv_matches(self, conn) -> bool:
        header = self.db.columns(conn)
        if header is None or not self.path.exists() or not self._ends_whole():
            return False
        try:
            return len(read_csv_rows(self.path)) == self.db.count(conn)
        except ValfreeError:
            return False

    def _ends_whole(self) -> bool:
        """The CSV exists and its last line is complete (a writer killed mid-line leaves it cut)."""
        try:
            with open(self.path, "rb") as fh:
                fh.seek(0, os.SEEK_END)
                if fh.tell() == 0:
                    return False
                fh.seek(-1, os.SEEK_END)
                return fh.read(1) == b"\n"
        except OSError:
            return False

    def _append_line(self, header: list[str], row: dict) -> None:
        buf = io.StringIO(newline="")
        csv.DictWriter(buf, fieldnames=header, extrasaction="ignore").writerow(row)
        try:
            with open(self.path, "a", newline="", encoding="utf-8", errors="surrogateescape") as fh:
                fh.write(buf.getvalue())  # one write of one whole line
        except OSError as exc:
            raise ValfreeError(f"cannot write {str(self.path)!r} ({exc.strerror or exc}); pass a writable --out.") from None

    def close(self) -> None:
        self.db.close()

    @staticmethod
    def remove(path: str | os.PathLike) -> None:
        """Delete a results CSV and its database (a merged part file, say)."""
        for p in (Path(path), db_path(path)):
            p.unlink(missing_ok=True)


def _key_text(key: tuple) -> str:
    # JSON escapes the lone surrogates that stand for a non-UTF-8 file name's bytes; SQLite stores UTF-8.
    return json.dumps(list(key))


def identity_columns(path: str | os.PathLike, missing_ok: bool = False) -> dict:
    """The ``path``, ``size`` and ``mtime`` columns of a checkpoint's row, as the store writes them.

    ``missing_ok``: a path with no file yet (a training callback's row for a checkpoint it did not keep)
    gets empty size and mtime instead of an error.
    """
    if missing_ok and not os.path.exists(path):
        return {"path": str(path), "size": "", "mtime": ""}
    resolved, size, mtime = file_identity(path)
    return {"path": resolved, "size": size, "mtime": _fmt_mtime(mtime)}


def checkpoint_key(path: str | os.PathLike) -> tuple[str, str, str]:
    """The results key of a checkpoint on disk; a rerun skips it when this key is in ``done_keys()``."""
    return ResultsStore.key(identity_columns(path))


def probe_row(probe) -> dict:
    """A probe result (:class:`valfree.HeadGradient`) as results columns: its ``as_dict()``, with the
    gram/direct choice stored as ``path_used`` so that it cannot be taken for the checkpoint's path."""
    row = probe.as_dict()
    row["path_used"] = row.pop("path")
    return row


def _fmt_mtime(value) -> str:
    try:
        return f"{float(value):.6f}"
    except (TypeError, ValueError):
        return str(value)


def _cell(value) -> str:
    """A value as the CSV holds it, so that rows read back from the store equal rows read from the CSV."""
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (list, tuple)):
        return "; ".join(map(str, value))
    return str(value)


def read_scores(path: str | os.PathLike) -> list[dict]:
    """Rows of a results CSV, with an error that says what to do if the file is missing or empty."""
    p = Path(path)
    if not p.exists():
        raise ValfreeError(f"{str(p)!r} does not exist; create it with 'valfree score CHECKPOINTS --model ... --data ... --out {p}'.")
    if p.is_dir():
        raise ValfreeError(f"{str(p)!r} is a folder, not a results CSV; pass the CSV that valfree score wrote.")
    # Read the CSV itself (never the database): reading must not create files, and the CSV is always
    # complete but for a cut last line, which read_csv_rows drops.
    rows = read_csv_rows(p)
    if not rows:
        raise ValfreeError(f"{p} holds no rows; score some checkpoints first.")
    return rows
