"""``valfree score``: the head-gradient probe of every checkpoint in a folder, one results row each.

Every checkpoint is probed on the same seeded batch. The loop itself (skip what is done, record
failures, append rows) is :mod:`valfree.commands.checkpoint_loop`; under torchrun the folder is split
across ranks by :mod:`valfree.commands.score_torchrun`.
"""

from __future__ import annotations

import os
from typing import Iterable

from ..batches import move_to
from ..errors import ValfreeError
from ..io.checkpoints import CheckpointRef, discover_checkpoints, is_hf_checkpoint_dir, load_into
from ..io.data import SPLITS, load_dataset, probe_batch
from ..io.factory import build_model
from ..io.hf_model import build_hf_model
from ..io.results import ResultsStore, probe_row
from ..probes import LOSSES, find_head, head_gradient
from ..probes.forward import parameter_dtype
from ..probes.presets import PRESETS, get_preset
from .checkpoint_loop import CheckpointLoop, RunSummary
from .score_torchrun import torchrun_scoring
from . import EXIT_PARTIAL_FAILURE

TARGETS = ("labels", "pseudo")


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="probe every checkpoint in a folder and write one CSV row per checkpoint")
    p.add_argument("checkpoints", nargs="+", help="a folder, a glob, or checkpoint files")
    p.add_argument("--model", required=False, help="MODULE:FACTORY or path/to/file.py:FACTORY returning the nn.Module")
    p.add_argument("--data", required=True, help="fashion-mnist[:DIR] | digits | npz:PATH | MODULE:FUNCTION")
    p.add_argument("--out", default="scores.csv", help="results CSV; rerunning skips checkpoints already scored")
    p.add_argument("--head", default=None, help="qualified name of the head module (default: found automatically)")
    p.add_argument("--loss", default=None, choices=list(LOSSES),
                   help="loss on the head's output (default: ce); not with --preset")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="probe recipe for dense, detection, diffusion and language models (docs/beyond.md); "
                        "rows record its selection mode")
    p.add_argument("--targets", default="labels", choices=list(TARGETS),
                   help="'pseudo' uses the model's own argmax, for unlabeled data")
    p.add_argument("--batch-size", type=int, default=256, help="size of the fixed probe batch")
    p.add_argument("--seed", type=int, default=0, help="seed that draws the probe batch")
    p.add_argument("--split", default="train", choices=list(SPLITS), help="which split to draw the batch from")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.preset and args.loss:
        raise ValfreeError(f"--loss and --preset cannot be combined: the {args.preset} preset sets its own loss.")
    # Under torchrun each rank scores its share into a part file that rank 0 merges; alone, a no-op.
    with torchrun_scoring(args.out, args.device) as ranks:
        refs, note = discover_checkpoints(args.checkpoints)
        summary = score_checkpoints(
            args.checkpoints, model_spec=args.model, data_spec=args.data, out=ranks.part, head=args.head,
            loss=args.loss or "ce", targets=args.targets, batch_size=args.batch_size, seed=args.seed,
            split=args.split, device=ranks.device, label_smoothing=args.label_smoothing, preset=args.preset,
            refs=ranks.share(refs), progress=ranks.rank == 0,
        )
        summary.scored, summary.failed = ranks.sum(summary.scored), ranks.sum(summary.failed)
    summary.out, summary.note, summary.skipped = str(args.out), note, ranks.skipped
    if ranks.rank == 0:
        print(summary.describe())
    return EXIT_PARTIAL_FAILURE if summary.failed else 0


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
) -> RunSummary:
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
    summary = RunSummary(out=str(out), note=note)
    loop = CheckpointLoop(refs, ResultsStore(out), summary)
    if not loop.todo:
        return summary
    model = None
    if model_spec is not None:
        model = build_model(model_spec).to(device)
        # A wrong or ambiguous head is one error, not one per checkpoint.
        if recipe is not None:
            recipe.check_heads(model, head)
        else:
            # Traced once on the probe inputs; the name is passed on, so no checkpoint traces again.
            head = find_head(model, head, move_to(x, device, parameter_dtype(model))).name
    elif not all(is_hf_checkpoint_dir(ref.path) for ref in loop.todo):
        raise ValfreeError("--model MODULE:FACTORY is required unless every checkpoint is a Hugging Face checkpoint-N/ folder.")

    def measure(ref: CheckpointRef) -> dict:
        nonlocal head
        net = load_into(model, ref.path) if model is not None else build_hf_model(ref.path).to(device)
        inputs = move_to(x, device, parameter_dtype(net))
        if head is None and recipe is None:
            # Each checkpoint folder builds a new model object of the same architecture: trace the first only.
            head = find_head(net, None, inputs).name
        probe_target = target if isinstance(target, str) else target.to(device)
        if recipe is not None:
            probe = recipe.probe(net, inputs, probe_target, head=head, seed=seed)
            return {"preset": recipe.name, "mode": recipe.mode, **probe_row(probe)}
        return probe_row(head_gradient(net, inputs, probe_target, head=head, loss=loss, label_smoothing=label_smoothing))

    return loop.run(measure, columns=lambda ref: {"step_source": ref.step_source}, desc="scoring", progress=progress)
