"""A Hugging Face checkpoint folder as a model, without running any code the folder names.

The folder's ``config.json`` is untrusted. valfree reads it as plain JSON and refuses it, in one
sentence and without prompting, when it asks for custom code (an ``auto_map`` anywhere in it) or names
an architecture that is not one of transformers' own model classes (the values of its
``MODEL_*_MAPPING_NAMES`` tables). The model is then built from its configuration class, its size is
checked on the meta device against the folder's weights before any real memory is allocated, and the
weights are read through :func:`valfree.io.checkpoints.load_state_dict` (safetensors or weights-only
torch files, sharded or not). ``trust_remote_code`` is never passed anywhere.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import CheckpointError, CheckpointTooLarge, IncompleteCheckpoint, UnsafeCheckpoint, ValfreeError
from .checkpoints import (
    HF_CONFIG_FILE,
    MIN_BUDGET_BYTES,
    _isfile,
    _mib,
    _read_json,
    hf_weight_files,
    load_into,
    load_state_dict,
    quote_path,
)


@functools.lru_cache(maxsize=1)
def known_architectures() -> frozenset[str]:
    """Every model class name transformers maps from a config type, across all of its tasks."""
    from transformers.models.auto import modeling_auto

    names: set[str] = set()
    for attr in dir(modeling_auto):
        if attr.startswith("MODEL") and attr.endswith("MAPPING_NAMES"):
            table = getattr(modeling_auto, attr)
            for value in getattr(table, "values", lambda: [])():
                names.update([value] if isinstance(value, str) else [v for v in value if isinstance(v, str)])
    return frozenset(names)


def _has_key(obj, key: str, depth: int = 0) -> bool:
    if depth > 20:
        return True  # a config nested this deep is not a real one; treat it as asking for code
    if isinstance(obj, dict):
        return key in obj or any(_has_key(v, key, depth + 1) for v in obj.values())
    if isinstance(obj, list):
        return any(_has_key(v, key, depth + 1) for v in obj)
    return False


def read_hf_config(folder: str | os.PathLike) -> dict:
    """The folder's config.json as a dict, refusing custom code (``auto_map``) before anything else."""
    p = Path(folder)
    cfg_path = p / HF_CONFIG_FILE
    if not os.path.lexists(cfg_path):
        hf_weight_files(p)  # a folder with nothing in it says so, rather than only that its config is missing
        raise IncompleteCheckpoint(
            f"{quote_path(p)} is incomplete: it has no config.json, so valfree cannot tell which model it holds; "
            "pass --model MODULE:FACTORY to score its weights with your own model."
        )
    config = _read_json(cfg_path, "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{quote_path(cfg_path)} is not a JSON object.")
    if _has_key(config, "auto_map"):
        raise UnsafeCheckpoint(
            f"{quote_path(cfg_path)} asks for custom code (auto_map), which valfree never runs; "
            "pass --model MODULE:FACTORY to score these weights with a model class you trust."
        )
    return config


def config_architecture(config: dict, cfg_path: Path) -> str:
    """The first architecture a config names, if it is one of transformers' own model classes."""
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    if arch is None or arch not in known_architectures():
        shown = archs[0] if isinstance(archs, list) and archs else archs
        raise UnsafeCheckpoint(
            f"{quote_path(cfg_path)} names no model class transformers knows (architectures: {shown!r:.80}); "
            "pass --model MODULE:FACTORY."
        )
    return arch


def _config_object(config: dict, cfg_path: Path):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, CONFIG_MAPPING_NAMES

    model_type = config.get("model_type")
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING_NAMES:
        raise UnsafeCheckpoint(
            f"{quote_path(cfg_path)} names no model_type transformers knows ({model_type!r:.80}); pass --model MODULE:FACTORY."
        )
    try:
        return CONFIG_MAPPING[model_type].from_dict(config)
    except Exception as exc:
        raise CheckpointError(
            f"{quote_path(cfg_path)} is not a valid {model_type} configuration ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no detail'})."
        ) from None


def _fill_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """save_pretrained omits weights tied to another one (lm_head to the embeddings): take them from their twin."""
    groups: dict[int, list[str]] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    filled = dict(state)
    for names in groups.values():
        present = [n for n in names if n in state]
        if present:
            for n in names:
                filled.setdefault(n, state[present[0]])
    return filled


def build_hf_model(folder: str | os.PathLike, *, max_bytes: int | None = None) -> nn.Module:
    """A Hugging Face checkpoint folder as a model, through transformers (safetensors or weights-only files).

    Refuses custom code and unknown architectures, names what an incomplete folder lacks, and refuses a
    config that declares a model far larger than its weights (more than four times, or than
    ``max_bytes``) before allocating it. Every refusal is one sentence, raised as a
    :class:`~valfree.errors.CheckpointError`; nothing prompts and nothing waits on stdin.
    """
    try:
        import transformers
    except ImportError:
        raise ValfreeError(
            f"{quote_path(folder)} is a Hugging Face checkpoint; install transformers (pip install 'valfree[huggingface]') "
            "or pass --model MODULE:FACTORY."
        ) from None
    p = Path(folder)
    config_dict = read_hf_config(p)
    files = hf_weight_files(p)  # names what is missing before anything is built
    arch = config_architecture(config_dict, p / HF_CONFIG_FILE)
    weight_bytes = sum(os.stat(f).st_size for f in files if _isfile(f))
    labels = config_dict.get("num_labels")
    # transformers builds an id2label entry per label while parsing the config, before any size check
    # on the model can run; every label needs at least one stored float, so the weights bound it.
    if isinstance(labels, int) and labels > max(1024, weight_bytes // 4):
        raise CheckpointTooLarge(
            f"{quote_path(p / HF_CONFIG_FILE)} declares {labels} labels, more than its {_mib(weight_bytes)} of weights "
            "can hold; the config is corrupt or hostile."
        )
    config = _config_object(config_dict, p / HF_CONFIG_FILE)
    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        raise UnsafeCheckpoint(f"{quote_path(p / HF_CONFIG_FILE)} names {arch!r}, which is not a transformers model class.")
    limit = max_bytes if max_bytes is not None else max(MIN_BUDGET_BYTES, 4 * weight_bytes)
    try:
        with torch.device("meta"):
            shell = cls(config)
        need = sum(t.numel() * t.element_size() for t in shell.state_dict().values())
        del shell
    except Exception as exc:
        raise CheckpointError(
            f"{quote_path(p / HF_CONFIG_FILE)} does not build a {arch} ({type(exc).__name__}: "
            f"{str(exc).strip().splitlines()[0][:200] if str(exc).strip() else 'no detail'})."
        ) from None
    if need > limit:
        raise CheckpointTooLarge(
            f"{quote_path(p / HF_CONFIG_FILE)} declares a {arch} of {_mib(need)}, more than the {_mib(limit)} budget "
            f"for its {_mib(weight_bytes)} of weights; if you trust it, raise the budget (max_bytes=, or --max-bytes)."
        )
    try:
        model = cls(config)
    except Exception as exc:
        raise CheckpointError(
            f"{quote_path(p / HF_CONFIG_FILE)} does not build a {arch} ({type(exc).__name__})."
        ) from None
    state = load_state_dict(p, max_bytes=max_bytes, expected_bytes=need)
    load_into(model, _fill_tied(model, state), source=p)
    return model
