"""Safe loading of checkpoints in every common format, and finding them on disk.

Checkpoints are untrusted input: nothing here runs arbitrary unpickling. ``.pt/.pth/.bin/.ckpt`` files
go through ``torch.load(weights_only=True)``, ``.safetensors`` through safetensors, and Hugging Face
``checkpoint-N/`` folders through their ``model.safetensors`` (or a weights-only ``pytorch_model.bin``).
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

from ..errors import ValfreeError

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".safetensors")
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
# Keys under which training scripts and frameworks nest the model's weights.
NESTED_STATE_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
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


def step_from_name(path: str | os.PathLike) -> int | None:
    """The training step (or epoch) encoded in a checkpoint's name: ``step=1200``, ``checkpoint-500``, ``epoch_3``, ``ckpt_0042``."""
    name = Path(path).name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in CHECKPOINT_SUFFIXES else name
    for pattern in _STEP_PATTERNS:
        match = pattern.search(stem)
        if match:
            return int(match.group(1))
    return None


def is_hf_checkpoint_dir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").exists() and any((p / f).exists() for f in HF_WEIGHT_FILES)


def discover_checkpoints(sources: str | os.PathLike | Iterable[str | os.PathLike]) -> tuple[list[CheckpointRef], str | None]:
    """Expand folders, globs and files into checkpoints ordered by step.

    Steps come from the file names. If any name carries no number, the whole list is ordered by
    modification time instead (step = rank), and the returned note says so.
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    found: list[str] = []
    for src in sources:
        src = str(src)
        if any(ch in src for ch in "*?["):
            matches = sorted(glob.glob(src))
            if not matches:
                raise ValfreeError(f"the pattern {src!r} matches no file.")
            found.extend(matches)
        elif is_hf_checkpoint_dir(src):
            found.append(src)
        elif os.path.isdir(src):
            inside = sorted(
                str(p) for p in Path(src).iterdir()
                if (p.is_file() and p.suffix in CHECKPOINT_SUFFIXES) or is_hf_checkpoint_dir(p)
            )
            if not inside:
                raise ValfreeError(
                    f"the folder {src} holds no checkpoint (files ending in {', '.join(CHECKPOINT_SUFFIXES)} "
                    "or Hugging Face checkpoint-N/ folders)."
                )
            found.extend(inside)
        elif os.path.exists(src):
            found.append(src)
        else:
            raise ValfreeError(f"{src} does not exist.")
    unique = list(dict.fromkeys(found))
    steps = [step_from_name(p) for p in unique]
    if all(s is not None for s in steps) and len(set(steps)) == len(steps):
        refs = [CheckpointRef(p, s, "name") for p, s in zip(unique, steps)]
        return sorted(refs, key=lambda r: r.step), None
    by_time = sorted(unique, key=lambda p: (os.path.getmtime(p), p))
    note = (
        "some checkpoint names carry no step number (or repeat one), so checkpoints are ordered by "
        "modification time and numbered 0, 1, 2, ..."
    )
    return [CheckpointRef(p, i, "mtime") for i, p in enumerate(by_time)], note


_UNSAFE_HINT = (
    "it needs arbitrary unpickling, which valfree refuses for untrusted files; if you trust it, convert it once with "
    "python -c \"import torch; m = torch.load('{p}', weights_only=False); "
    "torch.save(getattr(m, 'state_dict', lambda: m)(), '{p}.weights.pt')\" and score the .weights.pt file."
)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        # Only a pickled class or function (a GLOBAL opcode) means "unsafe"; other unpickler errors are corruption.
        if "GLOBAL" in text:
            extra = _lightning_safe_load(path)
            if extra is not None:
                return extra
            raise ValfreeError(f"{path} cannot be loaded safely: " + _UNSAFE_HINT.format(p=path)) from None
        raise ValfreeError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: {_first_line(text)}).") from None


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
    return text.strip().splitlines()[0][:200] if text.strip() else "no detail"


def _extract_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):  # cannot happen with weights_only, kept for in-memory callers
        return obj.state_dict()
    if not isinstance(obj, Mapping):
        raise ValfreeError(f"{path} holds a {type(obj).__name__}, not a state_dict (a mapping of names to tensors).")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if tensors and len(tensors) >= len(obj) / 2:
        return dict(tensors)
    for key in NESTED_STATE_KEYS:
        if isinstance(obj.get(key), Mapping):
            return _extract_state_dict(obj[key], path)
    raise ValfreeError(
        f"{path} holds no tensors at the top level nor under any of {', '.join(NESTED_STATE_KEYS)}; "
        "save model.state_dict() instead."
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint's weights without arbitrary unpickling. See the module docstring for formats."""
    p = Path(path)
    if is_hf_checkpoint_dir(p):
        for name in HF_WEIGHT_FILES:
            if (p / name).exists():
                return load_state_dict(p / name)
    if not p.exists():
        raise ValfreeError(f"{p} does not exist.")
    if p.is_dir():
        raise ValfreeError(f"{p} is a folder but not a Hugging Face checkpoint (config.json plus model.safetensors).")
    if p.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            return load_file(str(p), device="cpu")
        except Exception as exc:
            raise ValfreeError(f"{p} is not a readable safetensors file ({_first_line(str(exc))}).") from None
    return _extract_state_dict(_torch_load(p), p)


def _strip_prefix(state: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Drop a wrapper prefix (Lightning's ``model.``, DDP's ``module.``, ``_orig_mod.``) if that makes keys match."""
    if set(state) & model_keys:
        best, best_overlap = state, len(set(state) & model_keys)
    else:
        best, best_overlap = state, 0
    prefixes = {k.split(".", 1)[0] + "." for k in state if "." in k}
    for prefix in prefixes:
        stripped = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        for inner in ("", "module.", "_orig_mod."):
            candidate = {k[len(inner):]: v for k, v in stripped.items() if k.startswith(inner)} if inner else stripped
            overlap = len(set(candidate) & model_keys)
            if overlap > best_overlap:
                best, best_overlap = candidate, overlap
    return best


def load_into(model: nn.Module, path_or_state: str | os.PathLike | dict, strict: bool = True) -> nn.Module:
    """Load weights into ``model`` in place, matching a wrapper prefix if needed.

    Missing or unexpected keys (and shape mismatches) raise a :class:`ValfreeError` that names them.
    """
    state = path_or_state if isinstance(path_or_state, dict) else load_state_dict(path_or_state)
    where = "the state_dict" if isinstance(path_or_state, dict) else str(path_or_state)
    model_state = model.state_dict()
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
    model.load_state_dict(state, strict=strict)
    return model


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def file_identity(path: str | os.PathLike) -> tuple[str, int, float]:
    """(absolute path, size, mtime) of a checkpoint, the key that makes scoring resumable.

    For a Hugging Face folder, size and mtime are those of its weights file.
    """
    p = Path(path)
    target = next((p / f for f in HF_WEIGHT_FILES if (p / f).exists()), p) if p.is_dir() else p
    st = target.stat()
    return str(p.resolve()), int(st.st_size), round(st.st_mtime, 6)
