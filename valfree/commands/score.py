"""``valfree score``: the head-gradient probe of every checkpoint in a folder, one results row each.

Every checkpoint is probed on the same seeded batch. The loop itself (skip what is done, record
failures, append rows) is :mod:`valfree.commands.checkpoint_loop`; under torchrun the folder is split
across ranks by :mod:`valfree.commands.score_torchrun`.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Iterable

from ..errors import ValfreeError
from ..selection.rules import DEFAULT_PRED_SUBSET
from . import EXIT_PARTIAL_FAILURE
from .arguments import LOSSES, PRESETS, SPLITS, add_device, add_out, add_quiet, label_smoothing, nonnegative_int, positive_int
from .preflight import check_device, check_output_file

if TYPE_CHECKING:  # torch and the runner's helpers load when a command runs, not when the CLI starts
    from ..io.checkpoints import CheckpointRef
    from .checkpoint_loop import RunSummary

TARGETS = ("labels", "pseudo")


def add_parser(sub) -> None:
    p = sub.add_parser("score", help="probe every checkpoint in a folder and write one CSV row per checkpoint",
                       description="Probe every checkpoint on one fixed, seeded batch and write one results row per "
                                   "checkpoint; a rerun skips the checkpoints already scored.")
    p.add_argument("checkpoints", nargs="+", help="a folder, a glob, or checkpoint files")
    p.add_argument("--model", required=False,
                   help="MODULE:FACTORY or path/to/file.py:FACTORY returning the nn.Module "
                        "(default: none, allowed only when every checkpoint is a Hugging Face checkpoint-N/ folder)")
    p.add_argument("--data", required=True, help="fashion-mnist[:DIR] | digits | npz:PATH | MODULE:FUNCTION")
    add_out(p, "scores.csv", "results CSV; rerunning skips checkpoints already scored")
    p.add_argument("--head", default=None, help="qualified name of the head module (default: found automatically)")
    p.add_argument("--loss", default=None, choices=LOSSES,
                   help="loss on the head's output (default: ce); not with --preset")
    p.add_argument("--preset", default=None, choices=PRESETS,
                   help="probe recipe for dense, detection, diffusion and language models (docs/beyond.md); "
                        "rows record its selection mode (default: none, the classification probe)")
    p.add_argument("--targets", default="labels", choices=TARGETS,
                   help="'labels' uses the data's labels; 'pseudo' uses the model's own argmax, for unlabeled data")
    p.add_argument("--batch-size", type=positive_int, default=256, help="size of the fixed probe batch")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed that draws the probe batch")
    p.add_argument("--split", default="train", choices=SPLITS, help="which split to draw the batch from")
    add_device(p)
    p.add_argument("--label-smoothing", type=label_smoothing, default=0.0,
                   help="label smoothing of the cross-entropy, in [0, 1)")
    p.add_argument("--pred-subset", type=nonnegative_int, default=DEFAULT_PRED_SUBSET,
                   help="training items (the probe batch among them) whose predicted classes are recorded for "
                        "prediction changes and label agreement; 0 turns them off")
    p.add_argument("--max-bytes", type=positive_int, default=None,
                   help="memory a checkpoint file may ask for when loaded (default: from the file and model size)")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .score_torchrun import torchrun_scoring
    from ..io.checkpoints import discover_checkpoints

    if args.preset and args.loss:
        raise ValfreeError(f"--loss and --preset cannot be combined: the {args.preset} preset sets its own loss.")
    check_device(args.device)
    check_output_file(args.out, "--out", "scores.csv")
    # Under torchrun each rank scores its share into a part file that rank 0 merges; alone, a no-op.
    with torchrun_scoring(args.out, args.device) as ranks:
        refs, note = discover_checkpoints(args.checkpoints)
        summary = score_checkpoints(
            args.checkpoints, model_spec=args.model, data_spec=args.data, out=ranks.part, head=args.head,
            loss=args.loss or "ce", targets=args.targets, batch_size=args.batch_size, seed=args.seed,
            split=args.split, device=ranks.device, label_smoothing=args.label_smoothing, preset=args.preset,
            refs=ranks.share(refs), progress=ranks.rank == 0 and not args.quiet, pred_subset=args.pred_subset,
            max_bytes=args.max_bytes, settings_out=args.out if ranks.world > 1 else None,
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
    pred_subset: int = DEFAULT_PRED_SUBSET,
    max_bytes: int | None = None,
    settings_out: str | os.PathLike | None = None,
) -> RunSummary:
    """Probe each checkpoint on the same seeded batch and append one row per checkpoint to ``out``.

    Checkpoints already in ``out`` with the same (path, size, mtime) are skipped. A checkpoint that
    fails to load or to probe becomes a row with ``status=failed`` and its error; the others go on.
    ``refs`` (already discovered checkpoints, e.g. one rank's share under torchrun) overrides ``sources``.
    ``preset`` (see :mod:`valfree.probes.presets`) replaces ``loss`` with a dense, detection, diffusion or
    language-model probe; its rows also record ``preset`` and the selection ``mode`` it was measured with.

    Classification probes (cross-entropy, no preset) also record each checkpoint's predicted classes on
    a seeded training subset of ``pred_subset`` items that contains the probe batch (see
    :mod:`valfree.commands.score_predictions`), in the sidecar of ``out``, and write
    ``label_agreement``, ``pred_subset`` and, after the run, ``pred_change`` (under torchrun,
    :func:`~valfree.commands.score_torchrun.merge_parts` folds the ranks' sidecars and recomputes it). The store
    records the settings the rows were measured with and refuses to mix in other ones
    (``settings_out``: a file whose settings are checked too, the merged output under torchrun).
    ``max_bytes`` bounds what a checkpoint file may allocate.
    """
    from ..io.checkpoints import discover_checkpoints, is_hf_checkpoint_dir, load_into
    from ..io.data import load_dataset
    from ..io.factory import build_model
    from ..io.hf_model import build_hf_model
    from ..io.predictions import PredictionSidecar
    from ..io.results import ResultsStore, checkpoint_key, probe_row
    from ..probes import find_head, head_gradient
    from ..batches import move_to
    from ..probes.forward import parameter_dtype
    from ..probes.options import ProbeOptions
    from ..probes.presets import get_preset
    from .checkpoint_loop import CheckpointLoop, RunSummary
    from .preflight import check_model_on_batch, draw_probe_batch
    from .score_predictions import (
        TrainingSubset,
        agreement_columns,
        check_finite,
        digest,
        probe_and_classes,
        refresh_prediction_changes,
    )

    if pred_subset is None or pred_subset < 0:
        raise ValfreeError(f"--pred-subset must be 0 (off) or a positive number of items, not {pred_subset!r}.")
    recipe = get_preset(preset) if preset else None
    note = None
    if refs is None:
        refs, note = discover_checkpoints(sources)
    dataset = load_dataset(data_spec, split)
    track = recipe is None and loss == "ce" and pred_subset > 0
    # The subset's draw holds the probe batch, so its items are read once; both refuse data that cannot be batched.
    subset = TrainingSubset(dataset, batch_size, pred_subset, seed, data_spec, split) if track else None
    x, y = (subset.x_probe, subset.y_probe) if subset is not None else draw_probe_batch(dataset, data_spec, batch_size, seed)
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
    settings = {
        "data": data_spec, "split": split, "seed": seed, "batch_size": batch_size, "probe_batch": digest(x),
        "head": head, "loss": loss if recipe is None else None, "targets": targets, "preset": preset,
        "label_smoothing": label_smoothing, "pred_subset": subset.size if subset is not None else 0,
    }
    if settings_out is not None:
        ResultsStore(settings_out, settings=settings)
    summary = RunSummary(out=str(out), note=note)
    store = ResultsStore(out, settings=settings)
    sidecar = PredictionSidecar(out)
    if subset is not None:
        sidecar.open(subset.meta, subset.label_array())
    # A row scored without its classes (an older valfree, a copied CSV) is scored again, so that its
    # neighbours' prediction changes can be computed.
    loop = CheckpointLoop(refs, store, summary, complete=(lambda key: sidecar.get(key) is not None) if subset else None)
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
            check_model_on_batch(model, move_to(x, device, parameter_dtype(model)),
                                 target if isinstance(target, str) else target.to(device), loss=loss)
    elif not all(is_hf_checkpoint_dir(ref.path) for ref in loop.todo):
        raise ValfreeError("--model MODULE:FACTORY is required unless every checkpoint is a Hugging Face checkpoint-N/ folder.")

    options = ProbeOptions(head=head, loss=loss, label_smoothing=label_smoothing)

    def measure(ref: CheckpointRef) -> dict:
        nonlocal head
        net = (load_into(model, ref.path, max_bytes=max_bytes) if model is not None
               else build_hf_model(ref.path, max_bytes=max_bytes).to(device))
        if head is None and recipe is None:
            # Each checkpoint folder builds a new model object of the same architecture: trace the first only.
            head = find_head(net, None, move_to(x, device, parameter_dtype(net))).name
        probe_target = target if isinstance(target, str) else target.to(device)
        if recipe is not None:
            probe = recipe.probe(net, move_to(x, device, parameter_dtype(net)), probe_target, head=head, seed=seed)
            check_finite(probe)
            return {"preset": recipe.name, "mode": recipe.mode, **probe_row(probe)}
        if subset is None:
            probe = head_gradient(net, move_to(x, device, parameter_dtype(net)), probe_target, head=head, loss=loss,
                                  label_smoothing=label_smoothing)
            check_finite(probe)
            return probe_row(probe)
        probe, classes = probe_and_classes(net, head, subset, probe_target, options, device, batch_size)
        check_finite(probe)
        sidecar.put(checkpoint_key(ref.path), classes)
        return {**probe_row(probe), **agreement_columns(classes, subset.label_array())}

    from importlib.metadata import PackageNotFoundError, version

    try:
        __version__ = version("valfree")
    except PackageNotFoundError:  # run from a source tree that was never installed
        __version__ = "unknown"
    summary = loop.run(measure, columns=lambda ref: {"step_source": ref.step_source, "valfree_version": __version__},
                       desc="scoring", progress=progress)
    if subset is not None:
        refresh_prediction_changes(out)
    return summary
