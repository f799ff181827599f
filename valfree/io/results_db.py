"""The transactional core of the results store: SQLite next to the CSV that people read.

Every row lives in ``<out>.db`` (SQLite, standard library), keyed by the checkpoint's (path, size,
mtime), the key being the table's primary key. Writers hold SQLite's write lock (``BEGIN IMMEDIATE``)
for the whole of a row's transaction, the CSV update included (see :mod:`valfree.io.results`), so:

- two writers never duplicate a row and never lose one;
- a stale failure never replaces a result: a failed row replaces only a failed row;
- the database is the truth, and the CSV is re-exported from it whenever the two differ;
- file names that are not UTF-8 survive: rows are JSON (lone surrogates escaped) and the CSV is
  written and read with ``surrogateescape``.

The settings a run was measured with are stored once, and a run with other settings is refused (see
:meth:`ResultsDB.check_settings`).
"""

from __future__ import annotations

import csv
import io
import json
import os
import sqlite3
import uuid
from pathlib import Path

from ..errors import ValfreeError

# SQLite waits this long for another writer's lock before giving up (a scoring step is seconds).
BUSY_TIMEOUT_S = 120.0
_ENCODING = dict(encoding="utf-8", errors="surrogateescape")


def db_path(csv_path: str | os.PathLike) -> Path:
    p = Path(csv_path)
    return p.with_name(p.name + ".db")


def encode_row(row: dict) -> str:
    # json escapes lone surrogates (\udcff), so a non-UTF-8 path round-trips exactly.
    return json.dumps(row, ensure_ascii=True, allow_nan=True)


class ResultsDB:
    """Rows keyed by a string key, and the settings of the run that wrote them."""

    def __init__(self, csv_path: str | os.PathLike):
        self.csv_path = Path(csv_path)
        self.path = db_path(csv_path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fresh = not self.path.exists()
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None)
            # The rollback journal (not WAL) leaves no extra files beside the database between runs.
            self.conn.execute("PRAGMA journal_mode=DELETE")
            with self.write():
                self.conn.execute(
                    "CREATE TABLE IF NOT EXISTS rows (key TEXT PRIMARY KEY, seq INTEGER NOT NULL, ok INTEGER NOT NULL, row TEXT NOT NULL)"
                )
                self.conn.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        except sqlite3.DatabaseError as exc:
            raise ValfreeError(
                f"cannot open the results database {str(self.path)!r} ({exc}); move it aside, or pass another --out."
            ) from None
        except OSError as exc:
            raise ValfreeError(f"cannot write next to {str(self.csv_path)!r} ({exc.strerror or exc}); pass a writable --out.") from None
        self.fresh = fresh

    # -- transactions ----------------------------------------------------------------------------
    class _Write:
        def __init__(self, conn):
            self.conn = conn

        def __enter__(self):
            try:
                self.conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as exc:
                raise ValfreeError(f"the results database is locked by another writer for too long ({exc}); try again.") from None
            return self.conn

        def __exit__(self, kind, value, tb):
            self.conn.execute("COMMIT" if kind is None else "ROLLBACK")
            return False

    def write(self) -> "_Write":
        """A write transaction: holds SQLite's write lock, commits on success, rolls back on error."""
        return self._Write(self.conn)

    def close(self) -> None:
        self.conn.close()

    # -- rows ------------------------------------------------------------------------------------
    @staticmethod
    def rows(conn) -> list[dict]:
        return [json.loads(text) for (text,) in conn.execute("SELECT row FROM rows ORDER BY seq")]

    @staticmethod
    def count(conn) -> int:
        return int(conn.execute("SELECT COUNT(*) FROM rows").fetchone()[0])

    @staticmethod
    def get(conn, key: str) -> tuple[dict, bool] | None:
        found = conn.execute("SELECT row, ok FROM rows WHERE key = ?", (key,)).fetchone()
        return None if found is None else (json.loads(found[0]), bool(found[1]))

    @staticmethod
    def upsert(conn, key: str, row: dict, ok: bool, force: bool = False) -> tuple[bool, bool]:
        """Insert ``row`` or replace the row with the same key, unless that would put a failure over a
        result (``force`` skips that check). Returns (written, replaced). Call inside :meth:`write`."""
        old = conn.execute("SELECT ok, seq FROM rows WHERE key = ?", (key,)).fetchone()
        if old is not None and old[0] and not ok and not force:
            return False, False
        seq = old[1] if old is not None else int(conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM rows").fetchone()[0])
        conn.execute("INSERT OR REPLACE INTO rows (key, seq, ok, row) VALUES (?, ?, ?, ?)", (key, seq, int(ok), encode_row(row)))
        return True, old is not None

    @staticmethod
    def clear(conn) -> None:
        conn.execute("DELETE FROM rows")
        conn.execute("DELETE FROM meta")

    @staticmethod
    def columns(conn) -> list[str] | None:
        """The header of the CSV as last written, or None before the first export."""
        found = conn.execute("SELECT value FROM meta WHERE name = 'columns'").fetchone()
        return None if found is None else json.loads(found[0])

    @staticmethod
    def set_columns(conn, columns: list[str]) -> None:
        conn.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('columns', ?)", (json.dumps(columns),))

    # -- settings --------------------------------------------------------------------------------
    def settings(self) -> dict | None:
        found = self.conn.execute("SELECT value FROM meta WHERE name = 'settings'").fetchone()
        return None if found is None else json.loads(found[0])

    def check_settings(self, conn, settings: dict, described_as: str) -> None:
        """Record ``settings`` for a new store; refuse a run whose settings differ from the stored ones."""
        found = conn.execute("SELECT value FROM meta WHERE name = 'settings'").fetchone()
        if found is None:
            conn.execute("INSERT INTO meta (name, value) VALUES ('settings', ?)", (json.dumps(settings, sort_keys=True),))
            return
        old = json.loads(found[0])
        differing = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
        if differing:
            shown = ", ".join(f"{k} {old.get(k)!r} there, {settings.get(k)!r} now" for k in differing[:4])
            raise ValfreeError(
                f"{described_as} holds results measured with other settings ({shown}); pass another --out to keep "
                "the two apart, or move that file aside to start again."
            )

    # -- the CSV ---------------------------------------------------------------------------------
    def export(self, columns: list[str], rows: list[dict]) -> None:
        """Write the CSV to a unique temporary name and rename it over the old one (call inside the lock)."""
        buf = io.StringIO(newline="")
        writer = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        tmp = self.csv_path.with_name(f".{self.csv_path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            with open(tmp, "w", newline="", **_ENCODING) as fh:
                fh.write(buf.getvalue())
            os.replace(tmp, self.csv_path)
        except OSError as exc:
            raise ValfreeError(f"cannot write {str(self.csv_path)!r} ({exc.strerror or exc}); pass a writable --out.") from None
        finally:
            tmp.unlink(missing_ok=True)


def read_csv_rows(path: Path) -> list[dict]:
    """The complete rows of a CSV; a last line cut short by a crash (no newline at the end) is dropped."""
    try:
        with open(path, newline="", **_ENCODING) as fh:
            text = fh.read()
    except OSError as exc:
        raise ValfreeError(f"cannot read the results file {str(path)!r} ({exc.strerror or exc}).") from None
    if "\x00" in text:
        raise ValfreeError(f"cannot read the results file {str(path)!r}: it holds binary data, not CSV; pass another file.")
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if reader.fieldnames is None:
            return []
        rows = [dict(r) for r in reader]
    except csv.Error as exc:
        raise ValfreeError(f"cannot read the results file {str(path)!r} as CSV ({exc}); pass another file.") from None
    return [{k: v for k, v in r.items() if k is not None} for r in rows]
