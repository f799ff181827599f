"""Hugging Face ``checkpoint-N/`` folders on disk: which folders are checkpoints (complete or not),
and which weight files one holds, shard indexes checked (shards must be plain names in the same
folder, and every one must be there)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError, IncompleteCheckpoint, UnsafeCheckpoint
from .checkpoint_files import HF_CONFIG_FILE, HF_INDEX_FILES, HF_WEIGHT_FILES, _isfile, _read_json, quote_path

_CHECKPOINT_DIR = re.compile(r"^checkpoint-\d+$")


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
