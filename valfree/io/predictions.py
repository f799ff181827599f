"""The prediction sidecar: each checkpoint's predicted classes on the fixed training subset.

Prediction changes compare a checkpoint with its predecessor in step order, so the classes themselves
must outlive the run that measured them: a checkpoint added later, scored out of order or by another
torchrun rank still needs its neighbours' predictions. They live next to the results CSV, in a folder
``<out>.predictions/``:

- ``subset.json``: what the subset is (data spec, split, seed, size, a hash of its indices), written
  once; a later run on another subset is refused instead of mixing the two;
- ``labels.npy``: the given labels of the subset (-1 where there is none);
- one ``<key hash>.npy`` per checkpoint, keyed like the CSV's rows, holding its classes as int16 or
  int32.

Every file is plain numpy, read with ``allow_pickle=False`` and a size bound, and written to a unique
temporary name then renamed, so concurrent writers and crashes leave either the old file or the new
one, never a torn one, and a rerun that scores a checkpoint again just replaces its file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from ..errors import ValfreeError

# numpy's .npy header is at most a few hundred bytes for a 1-D array.
_HEADER_ALLOWANCE = 4096


def sidecar_path(results_csv: str | os.PathLike) -> Path:
    p = Path(results_csv)
    return p.with_name(p.name + ".predictions")


def key_name(key: tuple) -> str:
    """A file name for a results key: a hash, so any path (non-UTF-8 bytes included) maps to a safe name."""
    blob = "\x1f".join(os.fsencode(str(k)).decode("utf-8", "surrogateescape") for k in key)
    return hashlib.sha256(blob.encode("utf-8", "surrogateescape")).hexdigest()[:32] + ".npy"


def indices_hash(indices) -> str:
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def _atomic_save(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class PredictionSidecar:
    """Read and write the predicted classes of a results CSV's checkpoints (see the module docstring)."""

    def __init__(self, results_csv: str | os.PathLike):
        self.dir = sidecar_path(results_csv)

    @property
    def meta_path(self) -> Path:
        return self.dir / "subset.json"

    def meta(self) -> dict | None:
        try:
            text = self.meta_path.read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ValfreeError(f"cannot read {self.meta_path} ({exc}).") from None
        try:
            meta = json.loads(text)
        except json.JSONDecodeError:
            raise ValfreeError(f"{self.meta_path} is not valid JSON; move the folder {self.dir} aside to record it again.") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("size"), int):
            raise ValfreeError(f"{self.meta_path} does not describe a subset; move the folder {self.dir} aside to record it again.")
        return meta

    def open(self, meta: dict, labels: np.ndarray) -> None:
        """Start or continue recording on the subset ``meta`` describes; refuse another subset."""
        old = self.meta()
        if old is not None:
            differing = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if differing:
                raise ValfreeError(
                    f"the predictions in {self.dir} were recorded on another training subset ({', '.join(differing)} "
                    "differ); score into another --out, or move that folder aside."
                )
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_save(self.dir / "labels.npy", np.asarray(labels, dtype=np.int64).reshape(-1))
        _atomic_text(self.meta_path, json.dumps(meta, sort_keys=True))

    def _load(self, path: Path, size: int) -> np.ndarray | None:
        try:
            if path.stat().st_size > size * 8 + _HEADER_ALLOWANCE:
                return None  # not something this module wrote; never allocate what a file asks for
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, EOFError):
            return None
        if array.ndim != 1 or array.shape[0] != size or not np.issubdtype(array.dtype, np.integer):
            return None
        return array.astype(np.int64)

    def labels(self) -> np.ndarray | None:
        meta = self.meta()
        return None if meta is None else self._load(self.dir / "labels.npy", meta["size"])

    def put(self, key: tuple, classes: np.ndarray) -> None:
        classes = np.asarray(classes).reshape(-1)
        dtype = np.int16 if classes.size == 0 or int(classes.max(initial=0)) < np.iinfo(np.int16).max else np.int32
        _atomic_save(self.dir / key_name(key), classes.astype(dtype))

    def absorb(self, other: "PredictionSidecar") -> int:
        """Move ``other``'s classes into this sidecar (same subset) and remove ``other``; returns how
        many checkpoints moved. Used to fold torchrun ranks' part files into the output's sidecar."""
        meta = other.meta()
        if meta is None:
            return 0
        labels = other.labels()
        self.open(meta, labels if labels is not None else np.full(meta["size"], -1))
        moved = 0
        for path in sorted(other.dir.glob("*.npy")):
            if path.name != "labels.npy":
                os.replace(path, self.dir / path.name)
                moved += 1
        shutil.rmtree(other.dir, ignore_errors=True)
        return moved

    def get(self, key: tuple) -> np.ndarray | None:
        """The classes recorded for ``key``, or None if there are none (or the file is unreadable)."""
        meta = self.meta()
        return None if meta is None else self._load(self.dir / key_name(key), meta["size"])
