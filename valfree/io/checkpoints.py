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
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from ..errors import CheckpointError, IncompleteCheckpoint, NonFiniteWeights, ValfreeError

# The checks live in their own modules, one idea each; the names other modules and scripts import
# from here stay importable from here.
from .checkpoint_files import (  # noqa: F401
    CHECKPOINT_SUFFIXES,
    HF_CONFIG_FILE,
    HF_INDEX_FILES,
    HF_WEIGHT_FILES,
    MAX_JSON_BYTES,
    MAX_PICKLE_BYTES,
    MAX_SIZE_ARGUMENT,
    MIN_BUDGET_BYTES,
    MiB,
    _check_regular,
    _first_line,
    _isfile,
    _kind,
    _mib,
    _names,
    _read_json,
    memory_budget,
    quote_path,
    shell_quote,
)
from .checkpoint_guard import (  # noqa: F401
    LIGHTNING_DICT_TYPES,
    _check_safetensors,
    _check_torch_legacy,
    _check_torch_zip,
    _torch_load,
    _unsafe_hint,
)
from .hf_folders import _is_complete_hf_dir, hf_weight_files, is_hf_checkpoint_dir  # noqa: F401
from .pickle_scan import _scan_pickle  # noqa: F401

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

@dataclass(frozen=True)
class CheckpointRef:
    """A checkpoint on disk with the step it belongs to. ``step_source`` is 'name' or 'mtime'."""

    path: str
    step: int
    step_source: str


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
