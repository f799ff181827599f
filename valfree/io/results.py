"""The results store: one CSV row per scored checkpoint, appended as it is scored.

Rows are flushed one at a time, so an interrupted run keeps everything scored so far. A row is keyed
by the checkpoint's (path, size, mtime): a rerun skips keys already scored successfully and retries
failed ones. ``valfree score``, the Monitor and the training callbacks all write this format, so that
``valfree select`` and ``valfree report`` read any of them.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path
from typing import Iterable

from ..errors import ValfreeError
from .checkpoints import file_identity

# Leading columns, in this order; probe fields follow, then anything else a writer adds.
KEY_COLUMNS = ("step", "path", "size", "mtime", "status", "error")
PROBE_COLUMNS = (
    "grad_norm", "score_w", "score_z", "bias_grad_norm", "loss", "entropy", "confidence", "margin",
    "batch_size", "weight_norm", "feature_rms", "path_used", "warnings",
)
STATUS_OK, STATUS_FAILED = "ok", "failed"


class ResultsStore:
    """Append-only CSV of per-checkpoint results, readable while it grows.

    New columns may appear in later rows (the file is rewritten once with the wider header when that
    happens), so writers need not agree on every field in advance.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._rows: list[dict] = self._read() if self.path.exists() else []
        self._columns: list[str] = self._merge_columns([], self._rows)

    def _read(self) -> list[dict]:
        try:
            with open(self.path, newline="") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames is None:
                    return []
                return [dict(r) for r in reader]
        except (OSError, csv.Error, UnicodeDecodeError) as exc:
            raise ValfreeError(f"cannot read the results file {self.path} ({exc}); move it aside or pass another --out.") from None

    @staticmethod
    def _merge_columns(columns: list[str], rows: Iterable[dict]) -> list[str]:
        seen = list(columns)
        for row in rows:
            for key in row:
                if key not in seen:
                    seen.append(key)
        ordered = [c for c in KEY_COLUMNS + PROBE_COLUMNS if c in seen]
        return ordered + [c for c in seen if c not in ordered]

    def rows(self) -> list[dict]:
        return list(self._rows)

    @staticmethod
    def key(row: dict) -> tuple[str, str, str]:
        """The key of a row: (path, size, mtime) as text, the mtime with six decimals whatever a writer
        wrote, so that a key built from a file on disk equals the key read back from its row."""
        return str(row.get("path", "")), str(row.get("size", "")), _fmt_mtime(row.get("mtime", ""))

    def done_keys(self) -> set[tuple[str, str, str]]:
        """Keys of the rows scored successfully."""
        return {self.key(r) for r in self._rows if r.get("status", STATUS_OK) == STATUS_OK}

    def append(self, row: dict) -> None:
        """Add (or replace, for the same key) one row and write it to disk at once."""
        row = {k: _cell(v) for k, v in row.items()}
        replaced = [i for i, r in enumerate(self._rows) if "path" in row and self.key(r) == self.key(row)]
        columns = self._merge_columns(self._columns, [row])
        if replaced or columns != self._columns or not self.path.exists():
            for i in reversed(replaced):
                del self._rows[i]
            self._rows.append(row)
            self._columns = columns
            self._rewrite()
            return
        self._rows.append(row)
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=self._columns).writerow(row)

    def _rewrite(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._columns)
            writer.writeheader()
            writer.writerows(self._rows)
        os.replace(tmp, self.path)


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


def _cell(value):
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, (list, tuple)):
        return "; ".join(map(str, value))
    return value


def read_scores(path: str | os.PathLike) -> list[dict]:
    """Rows of a results CSV, with an error that says what to do if the file is missing or empty."""
    p = Path(path)
    if not p.exists():
        raise ValfreeError(f"{p} does not exist; create it with 'valfree score CHECKPOINTS --model ... --data ... --out {p}'.")
    rows = ResultsStore(p).rows()
    if not rows:
        raise ValfreeError(f"{p} holds no rows; score some checkpoints first.")
    return rows
