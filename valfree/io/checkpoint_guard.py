"""The checks a checkpoint file passes before any library reads it, per format, and the one call to
``torch.load``.

- torch zip: every member's CRC and uncompressed size, folder and encryption flags, then the pickle's
  opcodes (:mod:`.pickle_scan`) and every storage it declares against its record;
- torch legacy (pre-zip): the same opcode scan, every declared storage byte inside the file;
- safetensors: the header length and every tensor's dtype, shape and byte range.

Each check raises a :class:`~valfree.errors.CheckpointError` naming the file, never anything else.
"""

from __future__ import annotations

import io
import json
import math
import pickletools
import struct
import zipfile
from pathlib import Path

import torch

from ..errors import CheckpointError, UnsafeCheckpoint
from .checkpoint_files import (
    MAX_JSON_BYTES,
    MAX_PICKLE_BYTES,
    MiB,
    _check_regular,
    _first_line,
    _too_large,
    memory_budget,
    quote_path,
    shell_quote,
)
from .pickle_scan import _ints, _scan_pickle

_ZIP_MAGIC = b"PK\x03\x04"
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


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
