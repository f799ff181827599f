"""A walk over a pickle's opcodes that executes nothing and models just enough of the stack to see
which functions it calls, which sizes it passes them and which storages it declares.

Used before ``torch.load(weights_only=True)`` sees a file: weights-only unpickling refuses classes
outside torch's allowlist, but the allowed ones (``bytearray``, tensor and storage constructors) can
still be asked for gigabytes by a file of a few kilobytes.
"""

from __future__ import annotations

import io
import math
import pickletools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import CheckpointError, UnsafeCheckpoint
from .checkpoint_files import MAX_SIZE_ARGUMENT, _bare_size, _first_line, _too_large, quote_path

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
