"""Scoring a folder of checkpoints with the head-gradient probe into the results store."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn

from ..errors import ValfreeError
from ..probes import find_head, head_gradient
from ..probes.presets import get_preset
from .checkpoints import CheckpointRef, discover_checkpoints, file_identity, is_hf_checkpoint_dir, load_into
from .hf_model import build_hf_model
from .data import load_dataset, probe_batch
from .factory import build_model
from .results import STATUS_FAILED, STATUS_OK, ResultsStore


@dataclass
class ScoreSummary:
    """What a scoring run did: counts, the output file, and any note on ordering."""

    out: str
    scored: int = 0
    skipped: int = 0
    failed: int = 0
    note: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    def describe(self) -> str:
        lines = []
        if self.note:
            lines.append(f"note: {self.note}")
        lines.append(
            f"scored {self.scored}, skipped {self.skipped} already in {self.out}, failed {self.failed}"
        )
        lines += [f"  failed: {path}: {error}" for path, error in self.failures]
        return "\n".join(lines)


def probe_row(probe) -> dict:
    """A HeadGradient as a results-store row: its gram/direct choice is stored as ``path_used``."""
    row = probe.as_dict()
    row["path_used"] = row.pop("path")
    return row


def _model_dtype(model: nn.Module) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def score_checkpoints(
    sources: str | Iterable[str],
    model_spec: str | None,
    data_spec: str,
    out: str | os.PathLike = "scores.csv",
    head: str | None = None,
    loss: str = "ce",
    targets: str = "labels",
    batch_size: int = 256,
    seed: int = 0,
    split: str = "train",
    device: str = "cpu",
    label_smoothing: float = 0.0,
    progress: bool = True,
    refs: list[CheckpointRef] | None = None,
    preset: str | None = None,
) -> ScoreSummary:
    """Probe each checkpoint on the same seeded batch and append one row per checkpoint to ``out``.

    Checkpoints already in ``out`` with the same (path, size, mtime) are skipped. A checkpoint that
    fails to load or to probe becomes a row with ``status=failed`` and its error; the others go on.
    ``refs`` (already discovered checkpoints, e.g. one rank's share under torchrun) overrides ``sources``.
    ``preset`` (see :mod:`valfree.probes.presets`) replaces ``loss`` with a dense, detection, diffusion or
    language-model probe; its rows also record ``preset`` and the selection ``mode`` it was measured with.
    """
    recipe = get_preset(preset) if preset else None
    note = None
    if refs is None:
        refs, note = discover_checkpoints(sources)
    dataset = load_dataset(data_spec, split)
    x, y = probe_batch(dataset, batch_size, seed)
    if targets == "labels" and recipe is not None and not recipe.needs_labels:
        target = y  # the diffusion and lm presets read no labels (lm: an attention mask if y is one)
    elif targets == "labels":
        if (y < 0).all():
            raise ValfreeError(
                f"the data {data_spec!r} has no labels; score with --targets pseudo to use the model's own predictions."
            )
        target = y
    else:
        target = "pseudo"
    store = ResultsStore(out)
    done = store.done_keys()
    summary = ScoreSummary(out=str(out), note=note)
    todo = []
    for ref in refs:
        path, size, mtime = file_identity(ref.path)
        if (path, str(size), f"{mtime:.6f}") in done:
            summary.skipped += 1
        else:
            todo.append((ref, path, size, mtime))
    if not todo:
        return summary
    model = None
    if model_spec is not None:
        model = build_model(model_spec).to(device)
        # A wrong or ambiguous head is one error, not one per checkpoint.
        if recipe is not None:
            recipe.check_heads(model, head)
        else:
            find_head(model, head)
    elif not all(is_hf_checkpoint_dir(ref.path) for ref, *_ in todo):
        raise ValfreeError("--model MODULE:FACTORY is required unless every checkpoint is a Hugging Face checkpoint-N/ folder.")
    from tqdm.auto import tqdm

    bar = tqdm(todo, desc="scoring", unit="ckpt", disable=not progress, file=sys.stderr)
    for ref, path, size, mtime in bar:
        row = {"step": ref.step, "path": path, "size": size, "mtime": f"{mtime:.6f}", "step_source": ref.step_source}
        try:
            net = load_into(model, ref.path) if model is not None else build_hf_model(ref.path).to(device)
            dtype = _model_dtype(net)
            inputs = x.to(device=device, dtype=dtype) if x.is_floating_point() else x.to(device)
            probe_target = target if isinstance(target, str) else target.to(device)
            if recipe is not None:
                probe = recipe.probe(net, inputs, probe_target, head=head, seed=seed)
                row.update(preset=recipe.name, mode=recipe.mode)
            else:
                probe = head_gradient(net, inputs, probe_target, head=head, loss=loss, label_smoothing=label_smoothing)
            row.update(status=STATUS_OK, error="", **probe_row(probe))
            summary.scored += 1
        except ValfreeError as exc:
            row.update(status=STATUS_FAILED, error=str(exc))
        except Exception as exc:  # a bad checkpoint must not stop the other 99
            row.update(status=STATUS_FAILED, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
        if row["status"] == STATUS_FAILED:
            summary.failed += 1
            summary.failures.append((ref.path, row["error"]))
        store.append(row)
    return summary
