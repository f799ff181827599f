"""Safe loading of checkpoints in every common format, and finding them on disk.

Checkpoints are untrusted input. Nothing here runs arbitrary unpickling, opens anything but regular
files, or lets a small file allocate a large amount of memory:

- ``.pt/.pth/.bin/.ckpt`` go through ``torch.load(weights_only=True)``, but only after the file has been
  checked: for the zip format, every member's CRC and uncompressed size, and the pickle's opcodes
  (what it calls, which sizes it asks for, which storages it declares); for the legacy format, the
  same opcode scan with every declared storage bounded by the file size.
- ``.safetensors``: the header length and every declared tensor extent are checked against the file
  before safetensors reads it.
- Hugging Face ``checkpoint-N/`` folders: ``model.safetensors``, a weights-only ``pytorch_model.bin``, or
  their sharded form (an ``*.index.json`` naming shards in the same folder, every one of which must be there).

What a file may allocate is bounded by a budget (:func:`memory_budget`): at least 256 MiB, the file's
own size, and four times the model's own size when the model is known; ``max_bytes=`` overrides it.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import pickletools
import re
import shlex
import stat
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import (
    CheckpointError,
    CheckpointTooLarge,
    IncompleteCheckpoint,
    NonFiniteWeights,
    UnsafeCheckpoint,
    ValfreeError,
)

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
HF_CONFIG_FILE = "config.json"
# Keys under which training scripts and frameworks nest the model's weights.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
# When several wrapper prefixes fit the model equally well, the first of these wins, then the
# alphabetically first: the choice must not depend on set iteration order (PYTHONHASHSEED).
PREFERRED_PREFIXES = ("model.", "module.", "_orig_mod.", "net.", "network.")
_STEP_PATTERNS = (
    re.compile(r"(?:^|[^a-z])(?:global_)?step[=_-]?(\d+)", re.I),
    re.compile(r"checkpoint-(\d+)", re.I),
    re.compile(r"(?:^|[^a-z])(?:epoch|ep|iter|it)[=_-]?(\d+)", re.I),
    re.compile(r"(\d+)(?!.*\d)"),
)
_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")

MiB = 1 << 20
# The smallest budget: a file may always allocate this much, whatever its size.
MIN_BUDGET_BYTES = 256 * MiB
# JSON side files (config.json, shard indexes, safetensors headers) are small; a huge one is hostile.
MAX_JSON_BYTES = 64 * MiB
# The legacy format's pickles (names and shapes, no tensor data) fit in this much.
MAX_PICKLE_BYTES = 64 * MiB
# A pickle never legitimately asks bytearray() or a tensor constructor for more than this from a bare size.
MAX_SIZE_ARGUMENT = 1 * MiB


@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint on disk with the step it belongs to. ``step_source`` is 'name' or 'mtime'."""

    path: str
    step: int
    step_source: str


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


# ----------------------------------------------------------------------------------------- discovery


def step_from_name(path: str | os.PathLike) -> int | None:
    """The training step (or epoch) encoded in a checkpoint's name: ``step=1200``, ``checkpoint-500``, ``epoch_3``, ``ckpt_0042``."""
    name = Path(path).name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in CHECKPOINT_SUFFIXES else name
    for pattern in _STEP_PATTERNS:
        match = pattern.search(stem)
        if match:
            return int(match.group(1))
    return None


def _isfile(p: Path) -> bool:
    """A regular file (following symlinks), decided from stat alone: nothing is opened."""
    try:
        return stat.S_ISREG(os.stat(p).st_mode)
    except (OSError, ValueError):
        return False


def _is_complete_hf_dir(p: Path) -> bool:
    return p.is_dir() and _isfile(p / HF_CONFIG_FILE) and any(_isfile(p / f) for f in HF_WEIGHT_FILES + HF_INDEX_FILES)


def is_hf_checkpoint_dir(path: str | os.PathLike) -> bool:
    """A Hugging Face checkpoint folder, complete or not.

    True for a folder named ``checkpoint-N`` or holding a ``config.json``, a weights file or a shard
    index. Whether it is complete is decided when it is loaded, which names what is missing, so an
    incomplete folder becomes a failed row rather than silently disappearing from a run.
    """
    p = Path(path)
    if not p.is_dir():
        return False
    if _CHECKPOINT_DIR.match(p.name):
        return True
    return any(os.path.lexists(p / f) for f in (HF_CONFIG_FILE,) + HF_WEIGHT_FILES + HF_INDEX_FILES)


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


def _mtime(p: str) -> float:
    try:
        return os.stat(p).st_mtime
    except OSError:
        return 0.0


def discover_checkpoints(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[CheckpointRef], str | None]:
    """Expand folders, globs and files into checkpoints ordered by step.

    Steps come from the file names. If any name carries no number, the whole list is ordered by
    modification time instead (step = rank), and the returned note says so. Entries that are not
    regular files (FIFOs, sockets, devices) are skipped without being opened, and the note says so.
    Hugging Face ``checkpoint-N/`` folders are returned even when incomplete: loading one names what
    it lacks.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    found: list[str] = []
    skipped: list[str] = []
    for src in sources:
        src = os.fspath(src)
        if any(ch in src for ch in "*?["):
            matches = sorted(glob.glob(src))
            if not matches:
                raise ValfreeError(f"the pattern {quote_path(src)} matches no file.")
            for m in matches:
                if _isfile(Path(m)) or os.path.isdir(m):
                    found.append(m)
                elif os.path.lexists(m) and not os.path.exists(m):
                    found.append(m)  # a broken link: its load fails and says so, in its own row
                else:
                    skipped.append(m)
            if not any(m in found for m in matches):
                raise ValfreeError(f"the pattern {quote_path(src)} matches no regular file or folder.")
        elif _is_complete_hf_dir(Path(src)):
            found.append(src)
        elif os.path.isdir(src):
            inside = []
            for p in sorted(Path(src).iterdir()):
                if p.is_dir():
                    if is_hf_checkpoint_dir(p):
                        inside.append(str(p))
                elif p.suffix in CHECKPOINT_SUFFIXES:
                    (inside if _isfile(p) else skipped).append(str(p))
            if not inside:
                if is_hf_checkpoint_dir(src):
                    inside = [src]  # an incomplete checkpoint folder named on its own: its row says what is missing
                else:
                    raise ValfreeError(
                        f"the folder {quote_path(src)} holds no checkpoint (regular files ending in "
                        f"{', '.join(CHECKPOINT_SUFFIXES)} or Hugging Face checkpoint-N/ folders)."
                    )
            found.extend(inside)
        elif os.path.exists(src):
            if not _isfile(Path(src)):
                raise ValfreeError(f"{quote_path(src)} is {_kind(src)}, not a checkpoint file; pass regular files or folders.")
            found.append(src)
        else:
            raise ValfreeError(f"{quote_path(src)} does not exist.")
    unique = list(dict.fromkeys(found))
    notes = []
    if skipped:
        shown = ", ".join(f"{quote_path(s)} ({_kind(s)})" for s in skipped[:3])
        notes.append(f"skipped {len(skipped)} entr{'y' if len(skipped) == 1 else 'ies'} that "
                     f"{'is' if len(skipped) == 1 else 'are'} not a regular file: {shown}"
                     + (f" and {len(skipped) - 3} more" if len(skipped) > 3 else ""))
    steps = [step_from_name(p) for p in unique]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        refs = [CheckpointRef(p, s, "name") for p, s in zip(unique, steps)]
        return sorted(refs, key=lambda r: r.step), ("; ".join(notes) or None)
    by_time = sorted(unique, key=lambda p: (_mtime(p), p))
    notes.insert(0,
        "some checkpoint names carry no step number (or repeat one), so checkpoints are ordered by "
        "modification time and numbered 0, 1, 2, ..."
    )
    return [CheckpointRef(p, i, "mtime") for i, p in enumerate(by_time)], "; ".join(notes)


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


# --------------------------------------------------------------------------------------- pickle scan


class _Global:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _Call:
    __slots__ = ("func", "args")

    def __init__(self, func, args):
        self.func, self.args = func, args


class _Storage:
    __slots__ = ("key", "nbytes", "numel")

    def __init__(self, key: str, nbytes: int, numel: int):
        self.key, self.nbytes, self.numel = key, nbytes, numel


class _Opaque:
    """Anything the scan does not model (a dict being built, the result of BUILD)."""

    __slots__ = ()


_OPAQUE = _Opaque()


def _storage_element_sizes() -> dict[str, int]:
    import warnings

    sizes: dict[str, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage and quantized dtypes warn that they are deprecated
        for cls in torch._storage_classes:
            name = f"{cls.__module__}.{cls.__name__}"
            try:
                untyped = cls in (torch.UntypedStorage, torch.storage.TypedStorage)
                sizes[name] = 1 if untyped else torch.empty(0, dtype=cls.dtype).element_size()
            except Exception:
                sizes[name] = 8
    return sizes


_STORAGE_SIZES: dict[str, int] | None = None
_TENSOR_CONSTRUCTORS = {f"{c.__module__}.{c.__name__}" for c in torch._tensor_classes} | {
    "torch.Tensor", "torch._tensor.Tensor", "torch.UntypedStorage", "torch.storage.UntypedStorage",
    "torch.storage.TypedStorage", "torch.nn.parameter.Parameter",
}
_BYTE_CONSTRUCTORS = {"builtins.bytearray", "builtins.bytes", "__builtin__.bytearray", "__builtin__.bytes"}
_VIEW_REBUILDS = {"torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor_v3",
                  "torch._utils._rebuild_qtensor"}
_CONST_OPS = {
    "INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4", "FLOAT", "BINFLOAT", "STRING", "BINSTRING",
    "SHORT_BINSTRING", "BINBYTES", "SHORT_BINBYTES", "BINBYTES8", "UNICODE", "BINUNICODE", "SHORT_BINUNICODE",
    "BINUNICODE8", "BYTEARRAY8",
}


@dataclass
class _PickleFacts:
    storages: dict[str, int] = field(default_factory=dict)  # key -> declared bytes
    allocated: int = 0  # bytes that calls in the pickle itself would allocate


def _ints(x) -> list[int] | None:
    """A tuple/list of ints (or a torch.Size of one), as a list; None otherwise."""
    if isinstance(x, _Call) and isinstance(x.func, _Global) and x.func.name == "torch.Size" and x.args:
        x = x.args[0]
    if isinstance(x, (tuple, list)) and all(isinstance(v, int) and not isinstance(v, bool) for v in x):
        return list(x)
    return None


def _scan_pickle(data: bytes, path: Path, budget: int, what: str = "pickle") -> _PickleFacts:
    """Walk the pickle's opcodes without executing any, modelling just enough of the stack to see
    which globals it calls with which sizes, and which storages it declares.

    Raises :class:`CheckpointTooLarge` when the calls or storages would allocate more than ``budget``
    and :class:`CheckpointError` for opcodes no weights file uses. Unknown globals are left to
    ``torch.load(weights_only=True)`` to refuse, so the refusal keeps its conversion hint.
    """
    global _STORAGE_SIZES
    if _STORAGE_SIZES is None:
        _STORAGE_SIZES = _storage_element_sizes()
    facts = _PickleFacts()
    stack: list = []
    marks: list[int] = []
    memo: dict = {}

    def pop_mark() -> list:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    def account(func, args) -> None:
        name = func.name if isinstance(func, _Global) else None
        if name is None or not isinstance(args, tuple):
            return
        if name in _BYTE_CONSTRUCTORS:
            if args and isinstance(args[0], int) and args[0] > MAX_SIZE_ARGUMENT:
                raise _bare_size(path, f"asks {name.split('.')[-1]}() in its {what} for", args[0])
            return
        if name in _TENSOR_CONSTRUCTORS:
            dims = _ints(args) or (_ints(args[0]) if len(args) == 1 else None)
            if dims:
                need = math.prod(abs(d) for d in dims) * 8
                if need > MAX_SIZE_ARGUMENT:
                    raise _bare_size(path, f"asks a tensor constructor in its {what} for", need)
            return
        if name in _VIEW_REBUILDS and len(args) >= 4:
            storage, offset, size, strides = args[0], args[1], _ints(args[2]), _ints(args[3])
            if size is None:
                return
            numel = math.prod(abs(s) for s in size)
            if numel > budget:
                raise _too_large(path, f"declares in its {what} a tensor of at least", numel, budget)
            if name == "torch._utils._rebuild_qtensor" or not isinstance(storage, _Storage):
                facts.allocated += numel * 8
            elif isinstance(offset, int) and strides is not None and len(strides) == len(size) and numel:
                extent = offset + sum((s - 1) * st for s, st in zip(size, strides)) + 1
                if offset < 0 or min(strides, default=0) < 0 or extent > storage.numel:
                    raise CheckpointError(
                        f"{quote_path(path)} is not a readable torch checkpoint: a tensor reaches beyond its storage "
                        f"({extent} elements of {storage.numel})."
                    )
            return
        # Any other allowed call: a bare size argument this large is never part of a weights file.
        for a in args:
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > budget:
                raise _too_large(path, f"passes in its {what} a size argument of", abs(a), budget)

    def persistent(pid) -> object:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"):
            raise CheckpointError(f"{quote_path(path)} is not a readable torch checkpoint: malformed storage record.")
        stype, key, numel = pid[1], pid[2], pid[4]
        sname = stype.name if isinstance(stype, _Global) else None
        if sname not in _STORAGE_SIZES or not isinstance(numel, int) or numel < 0 or not isinstance(key, (str, int)):
            raise CheckpointError(f"{quote_path(path)} is not a readable torch checkpoint: unknown storage type or size.")
        nbytes = numel * _STORAGE_SIZES[sname]
        key = str(key)
        facts.storages[key] = max(nbytes, facts.storages.get(key, 0))
        if sum(facts.storages.values()) + facts.allocated > budget:
            raise _too_large(path, "declares storages of", sum(facts.storages.values()), budget)
        elements = numel if sname not in ("torch.UntypedStorage", "torch.storage.UntypedStorage") else nbytes
        return _Storage(key, nbytes, elements)

    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in _CONST_OPS:
                stack.append(arg)
            elif name == "NONE":
                stack.append(None)
            elif name in ("NEWTRUE", "NEWFALSE"):
                stack.append(name == "NEWTRUE")
            elif name in ("PROTO", "FRAME"):
                pass
            elif name == "STOP":
                break
            elif name == "MARK":
                marks.append(len(stack))
            elif name == "EMPTY_TUPLE":
                stack.append(())
            elif name in ("EMPTY_LIST", "EMPTY_DICT", "EMPTY_SET"):
                stack.append([] if name == "EMPTY_LIST" else _Opaque())
            elif name == "TUPLE":
                stack.append(tuple(pop_mark()))
            elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
                n = int(name[-1])
                items = tuple(stack[-n:])
                if len(items) != n:
                    raise IndexError("stack underflow")
                del stack[-n:]
                stack.append(items)
            elif name == "LIST":
                stack.append(pop_mark())
            elif name in ("DICT", "FROZENSET"):
                pop_mark()
                stack.append(_Opaque())
            elif name == "APPEND":
                v = stack.pop()
                if isinstance(stack[-1], list):
                    stack[-1].append(v)
            elif name == "APPENDS":
                items = pop_mark()
                if isinstance(stack[-1], list):
                    stack[-1].extend(items)
            elif name == "SETITEM":
                del stack[-2:]
                stack[-1]  # noqa: B018 - the target must exist
            elif name in ("SETITEMS", "ADDITEMS"):
                pop_mark()
                stack[-1]  # noqa: B018
            elif name == "POP":
                stack.pop()
            elif name == "POP_MARK":
                pop_mark()
            elif name == "DUP":
                stack.append(stack[-1])
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo[arg])
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack[-1]
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1]
            elif name == "GLOBAL":
                stack.append(_Global(".".join(str(arg).split(" ", 1))))
            elif name == "STACK_GLOBAL":
                qual, module = stack.pop(), stack.pop()
                if not isinstance(qual, str) or not isinstance(module, str):
                    raise CheckpointError(f"{quote_path(path)} is not a readable torch checkpoint: malformed global.")
                stack.append(_Global(f"{module}.{qual}"))
            elif name == "REDUCE":
                args = stack.pop()
                func = stack.pop()
                account(func, args)
                stack.append(_Call(func, args))
            elif name == "NEWOBJ":
                args = stack.pop()
                cls = stack.pop()
                account(cls, args)
                stack.append(_Call(cls, args))
            elif name == "NEWOBJ_EX":
                stack.pop()
                args = stack.pop()
                cls = stack.pop()
                account(cls, args)
                stack.append(_Call(cls, args))
            elif name == "OBJ":
                items = pop_mark()
                account(items[0], tuple(items[1:]))
                stack.append(_Call(items[0], tuple(items[1:])))
            elif name == "INST":
                items = pop_mark()
                func = _Global(".".join(str(arg).split(" ", 1)))
                account(func, tuple(items))
                stack.append(_Call(func, tuple(items)))
            elif name == "BUILD":
                stack.pop()
                stack[-1]  # noqa: B018
            elif name == "BINPERSID":
                stack.append(persistent(stack.pop()))
            elif name == "PERSID":
                raise CheckpointError(f"{quote_path(path)} is not a readable torch checkpoint: text persistent ids.")
            else:  # EXT1/2/4 (the copyreg registry), out-of-band buffers: never in a weights file
                raise UnsafeCheckpoint(
                    f"{quote_path(path)} uses the pickle opcode {name}, which no weights file needs; valfree refuses it."
                )
            if facts.allocated + sum(facts.storages.values()) > budget:
                raise _too_large(path, f"would allocate in its {what}", facts.allocated + sum(facts.storages.values()), budget)
    except CheckpointError:
        raise
    except Exception as exc:  # truncated or malformed opcodes, stack underflow, unknown memo keys
        raise CheckpointError(
            f"{quote_path(path)} is not a readable torch checkpoint (its {what} is corrupt: {_first_line(str(exc)) or type(exc).__name__})."
        ) from None
    return facts


# ------------------------------------------------------------------------------------ format checks

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


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


def _check_torch_zip(p: Path, budget: int) -> None:
    """Every member's CRC and size, then the pickle's calls and storages, before torch reads a byte."""
    try:
        with zipfile.ZipFile(p) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise CheckpointError(f"{quote_path(p)} is not a readable torch checkpoint: its zip repeats a member name.")
            # miniz (torch's zip reader) treats the MS-DOS folder attribute as "a folder, no data", and
            # reads encrypted members as garbage: both would load other weights than the CRCs vouch for.
            odd = [i.filename for i in infos if i.external_attr & 0x10 or i.flag_bits & 0x1 or i.filename.endswith("/")]
            if odd:
                raise CheckpointError(
                    f"{quote_path(p)} is not a readable torch checkpoint: its zip marks {odd[0]!r} as a folder or encrypted."
                )
            total = sum(i.file_size for i in infos)
            if total > budget:
                raise _too_large(p, "would decompress to", total, budget)
            pkls = [n for n in names if n.count("/") == 1 and n.endswith("/data.pkl")]
            tops = {n.split("/", 1)[0] for n in names}
            if len(pkls) != 1 or len(tops) != 1:
                raise CheckpointError(
                    f"{quote_path(p)} is not a readable torch checkpoint: a zip without exactly one <name>/data.pkl."
                )
            # Reading every member checks its CRC: a bit flip fails here instead of loading altered weights.
            for info in infos:
                with zf.open(info) as member:
                    while member.read(4 * MiB):
                        pass
            prefix = pkls[0][: -len("data.pkl")]
            facts = _scan_pickle(zf.read(pkls[0]), p, budget, "pickle")
            sizes = {i.filename: i.file_size for i in infos}
            for key, nbytes in facts.storages.items():
                record = f"{prefix}data/{key}"
                if record not in sizes:
                    raise CheckpointError(f"{quote_path(p)} is not a readable torch checkpoint: storage {key!r} is missing.")
                if sizes[record] < nbytes:
                    raise CheckpointError(
                        f"{quote_path(p)} is not a readable torch checkpoint: storage {key!r} declares "
                        f"{nbytes} bytes but holds {sizes[record]}."
                    )
    except CheckpointError:
        raise
    except Exception as exc:  # BadZipFile (CRC, headers), zlib errors, truncation, EOF
        raise CheckpointError(
            f"{quote_path(p)} is not a readable torch checkpoint ({type(exc).__name__}: {_first_line(str(exc))})."
        ) from None


def _check_torch_legacy(p: Path, size: int, budget: int) -> None:
    """The pre-zip format: five pickles then raw storages. Storages are allocated from the sizes the
    pickle declares before their bytes are read, so every declared byte must fit in the file."""
    try:
        with open(p, "rb") as f:
            # The pickles come before the raw storages and are small; a bounded prefix holds them.
            head = f.read(min(size, MAX_PICKLE_BYTES))
        stream = io.BytesIO(head)
        values = []
        for _ in range(2):  # the magic number, then the protocol version: small constants
            ops = list(_bounded_genops(stream, 64))
            values.append(next((a for op, a, _pos in ops if op.name.startswith(("LONG", "BININT", "INT"))), None))
        if values[0] != _LEGACY_MAGIC:
            raise CheckpointError(
                f"{quote_path(p)} is not a readable torch checkpoint (neither torch's zip format nor its legacy format)."
            )
        for op, _arg, _pos in _bounded_genops(stream, 10_000):  # sys_info: a small dict of ints and bools
            if op.name in ("GLOBAL", "STACK_GLOBAL", "REDUCE", "BINPERSID", "NEWOBJ", "INST", "OBJ"):
                raise CheckpointError(f"{quote_path(p)} is not a readable torch checkpoint: malformed header.")
        start = stream.tell()
        facts = _scan_pickle(head[start:], p, budget, "pickle")
        declared = sum(facts.storages.values())
        if declared > size:
            raise CheckpointError(
                f"{quote_path(p)} is not a readable torch checkpoint: it declares {declared} bytes of tensors in a {size}-byte file."
            )
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(
            f"{quote_path(p)} is not a readable torch checkpoint ({type(exc).__name__}: {_first_line(str(exc))})."
        ) from None


def _bounded_genops(stream: io.BytesIO, max_ops: int):
    for n, item in enumerate(pickletools.genops(stream)):
        if n > max_ops:
            raise ValueError("header pickle too long")
        yield item
        if item[0].name == "STOP":
            return


_SAFETENSORS_DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8, "C128": 16,
}


def _check_safetensors(p: Path, size: int, budget: int) -> None:
    """The header's length and every tensor's dtype, shape and byte range, against the file and the budget."""
    bad = f"{quote_path(p)} is not a readable safetensors file"
    try:
        with open(p, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{bad} (shorter than its 8-byte header length).")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_JSON_BYTES:
                raise CheckpointError(f"{bad} (its header claims {n} bytes in a {size}-byte file).")
            header = json.loads(f.read(n))
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{bad} (header: {_first_line(str(exc)) or type(exc).__name__}).") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{bad} (its header is not a JSON object).")
    data_len = size - 8 - n
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(info, dict):
            raise CheckpointError(f"{bad} (tensor {name!r} has no description).")
        shape, offsets, dtype = info.get("shape"), info.get("data_offsets"), info.get("dtype")
        if (_ints(shape) is None or any(s < 0 for s in shape) or _ints(offsets) is None or len(offsets) != 2
                or not 0 <= offsets[0] <= offsets[1] <= data_len or not isinstance(dtype, str)):
            raise CheckpointError(f"{bad} (tensor {name!r} declares a shape or byte range outside the file).")
        width = _SAFETENSORS_DTYPE_BYTES.get(dtype)
        if width is not None and math.prod(shape) * width != offsets[1] - offsets[0]:
            raise CheckpointError(f"{bad} (tensor {name!r}: its shape does not match its byte range).")
        total += offsets[1] - offsets[0]
    if total > budget:
        raise _too_large(p, "holds tensors of", total, budget)


# -------------------------------------------------------------------------------------- torch.load

_UNSAFE_HINT = (
    "it needs arbitrary unpickling, which valfree refuses for untrusted files; if you trust it, convert it once with "
    "python -c \"import sys, torch; m = torch.load(sys.argv[1], weights_only=False); "
    "torch.save(getattr(m, 'state_dict', lambda: m)(), sys.argv[1] + '.weights.pt')\" {q} "
    "and score the .weights.pt file."
)


def _unsafe_hint(path: Path) -> str:
    return _UNSAFE_HINT.format(q=shell_quote(path))


def _torch_load(path: Path, budget: int | None = None):
    size = _check_regular(path)
    budget = memory_budget(size) if budget is None else budget
    with open(path, "rb") as f:
        magic = f.read(4)
    # The same test torch.load uses to choose the zip reader: the file's first bytes.
    if magic == _ZIP_MAGIC:
        _check_torch_zip(path, budget)
    else:
        _check_torch_legacy(path, size, budget)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        # Only a pickled class or function (a GLOBAL opcode) means "unsafe"; other unpickler errors are corruption.
        if "GLOBAL" in text:
            extra = _lightning_safe_load(path)
            if extra is not None:
                return extra
            raise UnsafeCheckpoint(f"{quote_path(path)} cannot be loaded safely: " + _unsafe_hint(path)) from None
        raise CheckpointError(
            f"{quote_path(path)} is not a readable torch checkpoint ({type(exc).__name__}: {_first_line(text)})."
        ) from None


# Lightning pickles hyper-parameters as AttributeDict, a plain dict subclass. Reading it as a dict
# keeps the load weights-only and works without Lightning installed.
LIGHTNING_DICT_TYPES = (
    "lightning.fabric.utilities.data.AttributeDict",
    "lightning_fabric.utilities.data.AttributeDict",
    "pytorch_lightning.utilities.parsing.AttributeDict",
)


def _lightning_safe_load(path: Path):
    try:
        with torch.serialization.safe_globals([(dict, name) for name in LIGHTNING_DICT_TYPES]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None


def _first_line(text: str) -> str:
    text = text.strip()
    return text.splitlines()[0][:200] if text else "no detail"


def _extract_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):  # cannot happen with weights_only, kept for in-memory callers
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{quote_path(path)} holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors).")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) / 2:
        return {str(k): v for k, v in tensors.items()}
    for key in NESTED_STATE_KEYS:
        if isinstance(obj.get(key), Mapping):
            return _extract_state_dict(obj[key], path)
    raise CheckpointError(
        f"{quote_path(path)} holds no tensors at the top level nor under any of {', '.join(NESTED_STATE_KEYS)}; "
        "save model.state_dict() instead."
    )


# ------------------------------------------------------------------------------ Hugging Face folders


def _read_json(path: Path, what: str):
    size = _check_regular(path)
    if size > MAX_JSON_BYTES:
        raise CheckpointError(f"{quote_path(path)} is {_mib(size)}, too large for a {what}.")
    try:
        return json.loads(path.read_bytes())
    except Exception as exc:
        raise CheckpointError(f"{quote_path(path)} is not a readable {what} ({_first_line(str(exc))}).") from None


def hf_weight_files(folder: str | os.PathLike) -> list[Path]:
    """The weight files of a Hugging Face checkpoint folder, shards included, each checked to exist.

    Raises :class:`IncompleteCheckpoint` naming what is missing: no weights at all, an index without
    its shards, or a shard name that points outside the folder.
    """
    p = Path(folder)
    for name in HF_WEIGHT_FILES:
        if os.path.lexists(p / name):
            return [p / name]
    for name in HF_INDEX_FILES:
        index_path = p / name
        if not os.path.lexists(index_path):
            continue
        index = _read_json(index_path, "shard index")
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
            raise IncompleteCheckpoint(f"{quote_path(index_path)} has no weight_map naming its shards.")
        shards = sorted(set(weight_map.values()))
        outside = [s for s in shards if s != os.path.basename(s) or s in ("", ".", "..") or "\\" in s]
        if outside:
            raise UnsafeCheckpoint(
                f"{quote_path(index_path)} names shards outside its folder ({', '.join(map(quote_path, outside[:3]))}); valfree refuses it."
            )
        if name.startswith("model.safetensors") and not all(s.endswith(".safetensors") for s in shards):
            raise CheckpointError(f"{quote_path(index_path)} names shards that are not .safetensors files.")
        missing = [s for s in shards if not _isfile(p / s)]
        if missing:
            raise IncompleteCheckpoint(
                f"{quote_path(p)} is incomplete: {len(missing)} of the {len(shards)} shards named in {name} "
                f"{'is' if len(missing) == 1 else 'are'} missing ({', '.join(map(quote_path, missing[:3]))}"
                f"{' and more' if len(missing) > 3 else ''}); the save was probably interrupted."
            )
        return [p / s for s in shards]
    present = sorted(os.listdir(p))[:5] if os.path.isdir(p) else []
    raise IncompleteCheckpoint(
        f"{quote_path(p)} is incomplete: it holds no weights ({', '.join(HF_WEIGHT_FILES + HF_INDEX_FILES)})"
        + (f", only {', '.join(map(quote_path, present))}" if present else ", nothing at all")
        + "; the save was probably interrupted."
    )


def _load_hf_folder(p: Path, budget_for, check_finite: bool) -> dict[str, torch.Tensor]:
    files = hf_weight_files(p)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        part = _load_file(f, budget_for(f), check_finite=False)
        state.update(part)
    if len(files) > 1:
        index_name = next(n for n in HF_INDEX_FILES if os.path.lexists(p / n))
        expected = set(_read_json(p / index_name, "shard index")["weight_map"])
        missing = sorted(expected - set(state))
        if missing:
            raise IncompleteCheckpoint(
                f"{quote_path(p)} is incomplete: its shards lack {_names(missing)}, which {index_name} lists."
            )
    if check_finite:
        _raise_nonfinite(state, p)
    return state


# ---------------------------------------------------------------------------------------- loading


def _file_budget(path: Path, expected_bytes: int | None, max_bytes: int | None) -> int:
    try:
        size = os.stat(path).st_size
    except OSError:
        size = 0
    return memory_budget(size, expected_bytes, max_bytes)


def _load_file(p: Path, budget: int, check_finite: bool) -> dict[str, torch.Tensor]:
    size = _check_regular(p)
    if p.suffix == ".safetensors":
        _check_safetensors(p, size, budget)
        try:
            from safetensors.torch import load_file
            state = load_file(str(p), device="cpu")
        except Exception as exc:
            raise CheckpointError(f"{quote_path(p)} is not a readable safetensors file ({_first_line(str(exc))}).") from None
    else:
        state = _extract_state_dict(_torch_load(p, budget), p)
    if check_finite:
        _raise_nonfinite(state, p)
    return state


def load_state_dict(
    path: str | os.PathLike,
    *,
    max_bytes: int | None = None,
    expected_bytes: int | None = None,
    check_finite: bool = False,
) -> dict[str, torch.Tensor]:
    """Read a checkpoint's weights without arbitrary unpickling. See the module docstring for formats.

    ``max_bytes`` caps what the file may allocate (default: :func:`memory_budget` of the file's size and
    ``expected_bytes``, the model's own size when known). ``check_finite=True`` raises
    :class:`~valfree.errors.NonFiniteWeights` when a floating-point tensor holds NaN or inf.
    Every problem with the file is a :class:`~valfree.errors.CheckpointError` (a ``ValfreeError``).
    """
    p = Path(path)
    if p.is_dir():
        if is_hf_checkpoint_dir(p) or any(os.path.lexists(p / f) for f in HF_WEIGHT_FILES + HF_INDEX_FILES):
            return _load_hf_folder(p, lambda f: _file_budget(f, expected_bytes, max_bytes), check_finite)
        raise CheckpointError(
            f"{quote_path(p)} is a folder but not a Hugging Face checkpoint (config.json plus model.safetensors)."
        )
    if not os.path.lexists(p):
        raise CheckpointError(f"{quote_path(p)} does not exist.")
    return _load_file(p, _file_budget(p, expected_bytes, max_bytes), check_finite)


def find_nonfinite(state: Mapping[str, torch.Tensor], names: Iterable[str] | None = None, nan_only: Iterable[str] = ()) -> list[str]:
    """Names of floating-point tensors holding NaN or inf (only NaN for the names in ``nan_only``).

    Checked in chunks, so the check needs little memory beside the tensors themselves.
    """
    nan_only = set(nan_only)
    bad = []
    for name in (names if names is not None else state):
        t = state[name]
        if not isinstance(t, torch.Tensor) or not (t.is_floating_point() or t.is_complex()) or t.device.type == "meta":
            continue
        flat = t.detach().reshape(-1)
        test = torch.isnan if name in nan_only else (lambda c: ~torch.isfinite(c))
        if any(bool(test(chunk).any()) for chunk in flat.split(1 << 22)):
            bad.append(name)
    return bad


def _raise_nonfinite(state: Mapping[str, torch.Tensor], where, names=None, nan_only=()) -> None:
    bad = find_nonfinite(state, names, nan_only)
    if bad:
        raise NonFiniteWeights(
            f"{quote_path(where)} holds non-finite weights (NaN or inf) in {_names(bad)}; the run diverged or the file is corrupt, "
            "so it gets no score.",
            bad,
        )


def _strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (Lightning's ``model.``, DDP's ``module.``, ``_orig_mod.``) if that makes keys match.

    The candidate that matches most model keys wins; ties go to the preferred prefixes, then to the
    alphabetically first, so a checkpoint holding two prefixed models (``model.`` and ``ema.``, a
    teacher and a student) always loads the same one.
    """
    best, best_rank = state, (-len(set(state) & model_keys), -1, "")
    prefixes = sorted({k.split(".", 1)[0] + "." for k in state if "." in k})
    for prefix in prefixes:
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        for inner in ("", "module.", "_orig_mod."):
            candidate = {k[len(inner):]: v for k, v in stripped.items() if k.startswith(inner)} if inner else stripped
            full = prefix + inner
            pref = PREFERRED_PREFIXES.index(prefix) if prefix in PREFERRED_PREFIXES else len(PREFERRED_PREFIXES)
            rank = (-len(set(candidate) & model_keys), pref, full)
            if rank < best_rank:
                best, best_rank = candidate, rank
    return best


def model_bytes(model: nn.Module) -> int:
    """The size of the model's own state (parameters and buffers), the 'expected' size of its checkpoints."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))


def load_into(
    model: nn.Module,
    path_or_state: str | os.PathLike | dict,
    strict: bool = True,
    *,
    max_bytes: int | None = None,
    check_finite: bool = True,
    source: str | os.PathLike | None = None,
) -> nn.Module:
    """Load weights into ``model`` in place, matching a wrapper prefix if needed.

    Missing or unexpected keys (and shape mismatches) raise a :class:`ValfreeError` that names them.
    The file may allocate at most :func:`memory_budget` (four times the model's size, at least 256 MiB
    and the file's size) unless ``max_bytes`` says otherwise. Weights holding NaN or inf (NaN for
    buffers, where -inf masks are legitimate) raise :class:`~valfree.errors.NonFiniteWeights` before the
    model is touched, unless ``check_finite=False``. ``source`` names where a state_dict passed in
    memory came from, for the messages.
    """
    model_state = model.state_dict()
    if isinstance(path_or_state, dict):
        state, where = path_or_state, (quote_path(source) if source is not None else "the state_dict")
    else:
        state = load_state_dict(path_or_state, max_bytes=max_bytes, expected_bytes=model_bytes(model))
        where = quote_path(path_or_state)
    state = _strip_prefix(state, set(model_state))
    missing = [k for k in model_state if k not in state]
    unexpected = [k for k in state if k not in model_state]
    if strict and (missing or unexpected):
        parts = []
        if missing:
            parts.append(f"missing keys {_names(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_names(unexpected)}")
        raise ValfreeError(f"{where} does not fit the model: {' and '.join(parts)}; check --model against the run that saved it.")
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in model_state.items()
        if k in state and state[k].shape != v.shape
    ]
    if shapes:
        raise ValfreeError(f"{where} does not fit the model: shape mismatch in {_names(shapes)} (checkpoint vs model).")
    if check_finite:
        params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
        loaded = [k for k in model_state if k in state]
        bad = find_nonfinite(state, loaded, nan_only=[k for k in loaded if k not in params])
        if bad:
            raise NonFiniteWeights(
                f"{where} holds non-finite weights (NaN or inf) in {_names(bad)}; the run diverged or the file is "
                "corrupt, so it gets no score.",
                bad,
            )
    model.load_state_dict(state, strict=strict)
    return model


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def file_identity(path: str | os.PathLike) -> tuple[str, int, float]:
    """(absolute path, size, mtime) of a checkpoint, the key that makes scoring resumable.

    For a Hugging Face folder, size and mtime are those of its weights file; for a sharded one, the
    total size of its index and shards and the newest mtime among them. A path that cannot be read
    gets size 0 and mtime 0, so its load (not this call) reports the problem.
    """
    p = Path(path)
    try:
        if p.is_dir():
            single = next((p / f for f in HF_WEIGHT_FILES if _isfile(p / f)), None)
            if single is None:
                index = next((p / f for f in HF_INDEX_FILES if _isfile(p / f)), None)
                if index is not None:
                    try:
                        files = [index] + [f for f in hf_weight_files(p)]
                    except ValfreeError:
                        files = [index]
                    stats = [os.stat(f) for f in files if _isfile(f)]
                    return str(p.resolve()), int(sum(s.st_size for s in stats)), round(max(s.st_mtime for s in stats), 6)
            st = (single or p).stat()
        else:
            st = p.stat()
    except OSError:
        return str(p.absolute()), 0, 0.0
    return str(p.resolve()), int(st.st_size), round(st.st_mtime, 6)
