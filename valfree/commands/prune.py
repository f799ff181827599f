"""``valfree prune``: load a checkpoint through its factory, prune it, print the table, save it factory-free.

The pruning itself is :func:`valfree.pruning.prune_with` (the library's one pruning runner); this
module reads the checkpoint and the data specs, hands the options on as one
:class:`valfree.pruning.PruneOptions`, and writes the result with :func:`valfree.pruning.save_pruned`.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ..errors import ValfreeError
from .arguments import (PRUNE_TARGETS, add_device, add_out, add_quiet, fraction, nonnegative_int,
                        positive_float, positive_int, probability)
from .preflight import check_device, check_output_file

if TYPE_CHECKING:  # torch and the pruning runner load when the command runs, not when the CLI starts
    from ..pruning.options import PruneOptions
    from ..pruning.runner import PruneResult


def add_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint's channels (label-free with jbr) and save it factory-free",
                       description="Prune a checkpoint's channels (label-free with the jbr criterion), print the "
                                   "params, MACs and accuracy per step, and save a model that loads without its factory.")
    p.add_argument("checkpoint", help="the trained model's weights (.pt/.pth/.ckpt/.safetensors, loaded without pickle)")
    p.add_argument("--model", required=True, help="MODULE:FACTORY or path/to/file.py:FACTORY returning the nn.Module")
    p.add_argument("--data", required=True, help="calibration data (train split): fashion-mnist[:DIR] | digits | npz:PATH | MODULE:FUNCTION")
    p.add_argument("--criterion", default="jbr",
                   help="jbr (label-free), l1, bn_scale, fpgm, whc, random; with labels: jacobian, taylor, hessian")
    p.add_argument("--ratio", type=fraction, default=0.5, help="fraction to remove, strictly between 0 and 1")
    p.add_argument("--target", default="channels", choices=PRUNE_TARGETS, help="what --ratio counts")
    p.add_argument("--steps", type=positive_int, default=10, help="pruning rounds; data-driven criteria rescore before each")
    p.add_argument("--global", dest="global_pruning", action="store_true", help="rank channels across layers")
    p.add_argument("--confidence", type=probability, default=0.9, help="jbr keeps samples whose max probability exceeds this")
    p.add_argument("--calibration-size", type=positive_int, default=1024, help="training samples used to score channels")
    p.add_argument("--batch-size", type=positive_int, default=64, help="samples per calibration batch")
    p.add_argument("--no-bn-recalibration", dest="recalibrate_bn", action="store_false",
                   help="keep the BatchNorm statistics instead of re-estimating them after each step")
    p.add_argument("--finetune-steps", type=nonnegative_int, default=0,
                   help="SGD steps after pruning, matching the unpruned model's predictions (label-free)")
    p.add_argument("--finetune-lr", type=positive_float, default=0.01, help="learning rate of the fine-tuning steps")
    p.add_argument("--test-data", default=None, help="labelled data spec whose test split is used to report accuracy")
    p.add_argument("--test-size", type=positive_int, default=2000, help="test images used for the accuracy column")
    p.add_argument("--head", default=None, help="qualified name of the classifier head (default: found automatically)")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME", help="a layer not to prune (repeatable)")
    add_device(p)
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the calibration subset and fine-tuning batches")
    add_out(p, "pruned.safetensors",
            "the pruned model: a safetensors file that valfree.pruning.load_pruned reads without the factory",
            aliases=("--output",))
    add_quiet(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..pruning.options import PruneOptions

    check_device(args.device)
    check_output_file(args.out, "--out", "pruned.safetensors")
    options = PruneOptions(
        target=args.target, global_pruning=args.global_pruning, confidence=args.confidence,
        calibration_size=args.calibration_size, batch_size=args.batch_size, recalibrate_bn=args.recalibrate_bn,
        finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr, head=args.head,
        ignored_layers=tuple(args.ignore), device=args.device, seed=args.seed,
    )
    if not args.quiet and sys.stderr.isatty():
        # Pruning runs for minutes with nothing to print until its table; say what it is doing.
        finetune = f", then {args.finetune_steps} fine-tuning steps" if args.finetune_steps else ""
        print(f"pruning {args.checkpoint} with {args.criterion}: {100 * args.ratio:g}% of {args.target} in "
              f"{args.steps} steps{finetune}; this can take minutes on a CPU", file=sys.stderr, flush=True)
    prune_checkpoint(args.checkpoint, model_spec=args.model, data_spec=args.data, output=args.out,
                     criterion=args.criterion, ratio=args.ratio, steps=args.steps, options=options,
                     test_data=args.test_data, test_size=args.test_size, before_saving=_print_result)
    print(f"wrote {args.out}")
    return 0


def _print_result(result) -> None:
    """The table and the summary, printed before the model is saved: a model that cannot be saved
    still shows what pruning it achieved."""
    print(result.table())
    kept = "" if result.kept_fraction is None else f"; {100 * result.kept_fraction:.1f}% of calibration samples above --confidence"
    print(f"{result.criterion}: removed {100 * result.removed('params'):.1f}% of params and "
          f"{100 * result.removed('macs'):.1f}% of MACs{kept}", flush=True)


def prune_checkpoint(checkpoint: str | os.PathLike, *, model_spec: str, data_spec: str, output: str | os.PathLike,
                     criterion: str = "jbr", ratio: float = 0.5, steps: int = 10,
                     options: PruneOptions | None = None, test_data: str | None = None,
                     test_size: int | None = 2000, before_saving: Callable[[PruneResult], None] | None = None):
    """Prune the model in ``checkpoint`` and write it to ``output``; returns the PruneResult.

    ``test_data`` is a data spec whose 'test' split (its first ``test_size`` items, seeded) is used to
    report accuracy; it never influences the pruning. ``before_saving(result)`` is called once the
    pruning is done, before the file is written.
    """
    import torch
    from torch.utils.data import Subset

    from ..io.checkpoints import load_into
    from ..io.data import load_dataset
    from ..io.factory import build_model
    from ..pruning import get_criterion, prune_with, save_pruned
    from ..pruning.options import PruneOptions, check_arguments

    options = options or PruneOptions()
    output = Path(output)
    _check_writable(output)
    get_criterion(criterion)  # fail on a typo before loading anything
    check_arguments(ratio, steps, options.target, options.finetune_steps)
    if not model_spec:
        raise ValfreeError("--model MODULE:FACTORY is required: pruning needs the architecture the checkpoint fits.")
    model = build_model(model_spec)
    load_into(model, checkpoint)
    data = load_dataset(data_spec, "train")
    eval_data = None
    if test_data:
        eval_data = load_dataset(test_data, "test")
        if test_size is not None and test_size < len(eval_data):
            g = torch.Generator().manual_seed(0)
            eval_data = Subset(eval_data, torch.randperm(len(eval_data), generator=g)[:test_size].tolist())
    result = prune_with(model, data, criterion, ratio, steps, options, eval_data=eval_data)
    if before_saving is not None:
        before_saving(result)
    info = {"checkpoint": str(checkpoint), "model": model_spec, "data": data_spec, **result.to_dict()}
    save_pruned(result.model, output, result.example_inputs, info=info)
    return result


def _check_writable(output: Path) -> None:
    """Fail before the (long) pruning run, not after it."""
    if output.is_dir():
        raise ValfreeError(f"the output {output} is a folder; give a file name such as "
                           f"{output / 'pruned.safetensors'}.")
    parent = output.parent if str(output.parent) else Path(".")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise ValfreeError(f"cannot write {output}: the folder {parent} is not writable.")
