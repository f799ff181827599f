"""What a checkpoint file is, how it is named in messages, and how much loading it may allocate.

Shared by the format checks (:mod:`.checkpoint_guard`), the pickle scan (:mod:`.pickle_scan`), Hugging
Face folders (:mod:`.hf_folders`) and the public entry (:mod:`.checkpoints`): file names are quoted
with ``repr`` in sentences and ``shlex`` in shell hints, only regular files are opened, and every
format is bounded by the same budget.
"""

from __future__ import annotations

import json
import os
import shlex
import stat
from pathlib import Path

from ..errors import CheckpointError, CheckpointTooLarge, ValfreeError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_CONFIG_FILE = "config.json"

MiB = 1 << 20
# The smallest budget: a file may always allocate this much, whatever its size.
MIN_BUDGET_BYTES = 256 * MiB
# JSON side files (config.json, shard indexes, safetensors headers) are small; a huge one is hostile.
MAX_JSON_BYTES = 64 * MiB
# The legacy format's pickles (names and shapes, no tensor data) fit in this much.
MAX_PICKLE_BYTES = 64 * MiB
# A pickle never legitimately asks bytearray() or a tensor constructor for more than this from a bare size.
MAX_SIZE_ARGUMENT = 1 * MiB


# ---------------------------------------------------------------------------------------------- names


def quote_path(path: str | os.PathLike) -> str:
    """A path as it may appear inside a sentence: Python's repr, so quotes, control characters and
    bytes that are not UTF-8 (surrogate escapes) are all visible and printable."""
    return repr(os.fspath(path) if not isinstance(path, bytes) else os.fsdecode(path))


def shell_quote(path: str | os.PathLike) -> str:
    """A path as one shell word that is safe to paste: ``shlex.quote``, or ANSI-C ``$'...'`` quoting
    (bash, zsh, ksh, POSIX 2024 sh) when the name holds bytes that are not printable UTF-8."""
    text = os.fspath(path) if not isinstance(path, bytes) else os.fsdecode(path)
    if text.isprintable():
        try:
            text.encode("utf-8")
            return shlex.quote(text)
        except UnicodeEncodeError:
            pass
    raw = os.fsencode(text)
    out = []
    for b in raw:
        ch = chr(b)
        if ch in "\\'":
            out.append("\\" + ch)
        elif 0x20 <= b < 0x7F:
            out.append(ch)
        else:
            out.append(f"\\x{b:02x}")
    return "$'" + "".join(out) + "'"


def _isfile(p: Path) -> bool:
    """A regular file (following symlinks), decided from stat alone: nothing is opened."""
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except (OSError, ValueError):
        return False


def _kind(p: str) -> str:
    try:
        mode = os.stat(p).st_mode
    except OSError:
        return "a broken link"
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _check_regular(p: Path) -> int:
    """The file's size; refuses anything that is not a regular file before anything opens it."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        raise CheckpointError(f"{quote_path(p)} does not exist.") from None
    except OSError as exc:
        raise CheckpointError(f"{quote_path(p)} cannot be read ({exc.strerror or type(exc).__name__}).") from None
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{quote_path(p)} is {_kind(str(p))}, not a checkpoint file.")
    return st.st_size


# ------------------------------------------------------------------------------------------- budget


def memory_budget(file_bytes: int, expected_bytes: int | None = None, max_bytes: int | None = None) -> int:
    """How many bytes loading one checkpoint may allocate.

    ``max_bytes`` wins when given. Otherwise the largest of 256 MiB, the file's size (stored tensors
    can never exceed it) and four times ``expected_bytes``, the model's own size when it is known
    (room for optimizer state and compression).
    """
    if max_bytes is not None:
        if max_bytes <= 0:
            raise ValfreeError(f"the memory budget must be positive, got {max_bytes} bytes.")
        return int(max_bytes)
    return int(max(MIN_BUDGET_BYTES, file_bytes, 4 * (expected_bytes or 0)))


def _mib(n: int) -> str:
    if n < MiB:
        return f"{n / 1024:.1f} KiB"
    return f"{n / MiB:.1f} MiB" if n < (1 << 30) else f"{n / (1 << 30):.2f} GiB"


def _too_large(path: Path, what: str, need: int, budget: int) -> CheckpointTooLarge:
    return CheckpointTooLarge(
        f"{quote_path(path)} {what} {_mib(need)}, more than the {_mib(budget)} budget for this file; "
        "if you trust it, raise the budget (max_bytes=, or the --max-bytes option)."
    )


def _bare_size(path: Path, what: str, need: int) -> CheckpointTooLarge:
    return CheckpointTooLarge(
        f"{quote_path(path)} {what} {_mib(need)} from a bare size, which no weights file does; valfree refuses it."
    )


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:200] if text else "no detail"


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _read_json(path: Path, what: str):
    size = _check_regular(path)
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{quote_path(path)} is {_mib(size)}, too large for a {what}.")
    try:
        return json.loads(path.read_bytes())
    except Exception as exc:
        raise CheckpointError(f"{quote_path(path)} is not a readable {what} ({_first_line(str(exc))}).") from None
