"""The ``valfree`` command. Thin: it parses arguments and calls the layers.

User mistakes raise :class:`valfree.ValfreeError`; they are printed as one sentence on stderr with
exit code 2. Exit code 1 means the command ran but some items failed (recorded in its output).
"""

from __future__ import annotations

import argparse
import sys

from .errors import ValfreeError

EXIT_PARTIAL_FAILURE = 1
EXIT_USER_ERROR = 2


# ----- score / select / report / demo (core) ---------------------------------------------------------


def add_score_parser(sub) -> None:
    p = sub.add_parser("score", help="probe every checkpoint in a folder and write one CSV row per checkpoint")
    p.add_argument("checkpoints", nargs="+", help="a folder, a glob, or checkpoint files")
    p.add_argument("--model", required=False, help="MODULE:FACTORY or path/to/file.py:FACTORY returning the nn.Module")
    p.add_argument("--data", required=True, help="fashion-mnist[:DIR] | digits | npz:PATH | MODULE:FUNCTION")
    p.add_argument("--out", default="scores.csv", help="results CSV; rerunning skips checkpoints already scored")
    p.add_argument("--head", default=None, help="qualified name of the head module (default: found automatically)")
    p.add_argument("--loss", default=None, choices=["ce", "bce", "focal", "mse", "l1"],
                   help="loss on the head's output (default: ce); not with --preset")
    p.add_argument("--preset", default=None,
                   choices=["classification", "segmentation", "centernet", "diffusion-eps", "diffusion-v", "lm"],
                   help="probe recipe for dense, detection, diffusion and language models (docs/beyond.md); "
                        "rows record its selection mode")
    p.add_argument("--targets", default="labels", choices=["labels", "pseudo"],
                   help="'pseudo' uses the model's own argmax, for unlabeled data")
    p.add_argument("--batch-size", type=int, default=256, help="size of the fixed probe batch")
    p.add_argument("--seed", type=int, default=0, help="seed that draws the probe batch")
    p.add_argument("--split", default="train", choices=["train", "test"], help="which split to draw the batch from")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.set_defaults(func=run_score)


def run_score(args) -> int:
    from .integrations.torchrun import torchrun_scoring
    from .io.checkpoints import discover_checkpoints
    from .io.scoring import score_checkpoints

    if args.preset and args.loss:
        raise ValfreeError(f"--loss and --preset cannot be combined: the {args.preset} preset sets its own loss.")
    # Under torchrun each rank scores its share into a part file that rank 0 merges; alone, a no-op.
    with torchrun_scoring(args.out, args.device) as run:
        refs, note = discover_checkpoints(args.checkpoints)
        summary = score_checkpoints(
            args.checkpoints, model_spec=args.model, data_spec=args.data, out=run.part, head=args.head,
            loss=args.loss or "ce", targets=args.targets, batch_size=args.batch_size, seed=args.seed,
            split=args.split, device=run.device, label_smoothing=args.label_smoothing, preset=args.preset,
            refs=run.share(refs), progress=run.rank == 0,
        )
        summary.scored, summary.failed = run.sum(summary.scored), run.sum(summary.failed)
    summary.out, summary.note, summary.skipped = str(args.out), note, run.skipped
    if run.rank == 0:
        print(summary.describe())
    return EXIT_PARTIAL_FAILURE if summary.failed else 0


def add_select_parser(sub) -> None:
    p = sub.add_parser("select", help="choose a checkpoint from a scores CSV; prints its path last")
    p.add_argument("scores", help="CSV written by 'valfree score' (or a Hugging Face output folder)")
    p.add_argument("--column", default="grad_norm", help="score column (grad_norm, score_w, score_z, entropy, ...)")
    p.add_argument("--tail", default="0.2", help="fraction of the trajectory (0.2) or a count of points (10)")
    p.add_argument("--ema", type=float, default=3, help="EMA span; 1 disables smoothing")
    p.add_argument("--mode", default=None, choices=["min", "max"], help="default: the column's natural direction")
    p.add_argument("--json", action="store_true", help="print the choice as JSON instead of a table")
    p.set_defaults(func=run_select)


def run_select(args) -> int:
    from .io.selection_io import select_from_file

    select_from_file(args.scores, column=args.column, tail=args.tail, ema=args.ema, mode=args.mode, as_json=args.json)
    return 0


def add_report_parser(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report with plots")
    p.add_argument("scores", help="CSV written by 'valfree score'")
    p.add_argument("--metrics", default=None, help="CSV of held-out metrics (path or step, then metric columns)")
    p.add_argument("--metric", default=None, help="which metric column to use (default: the first)")
    p.add_argument("--column", default="grad_norm", help="score column")
    p.add_argument("--tail", default="0.2")
    p.add_argument("--ema", type=float, default=3)
    p.add_argument("--mode", default=None, choices=["min", "max"])
    p.add_argument("-o", "--output", default="report.html")
    p.set_defaults(func=run_report)


def run_report(args) -> int:
    from .io.report import write_report

    path = write_report(args.scores, args.output, metrics=args.metrics, metric=args.metric, column=args.column,
                        tail=args.tail, ema=args.ema, mode=args.mode)
    print(f"wrote {path}")
    return 0


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a small CNN, save checkpoints, select one without labels, write a report")
    p.add_argument("--out", default="valfree-demo", help="folder for checkpoints, scores and the report")
    p.add_argument("--data", default=None, help="default: fashion-mnist if its files are present, else digits")
    p.add_argument("--epochs", type=int, default=None, help="default: 6 on Fashion-MNIST, 40 on digits")
    p.add_argument("--train-size", type=int, default=None, help="training images used (default: 12000 / all)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from .demo import run_demo as demo

    return demo(out=args.out, data=args.data, epochs=args.epochs, train_size=args.train_size, seed=args.seed)


# ----- tpv (issue: TPV) -------------------------------------------------------------------------------
# BEGIN tpv subcommand
def add_tpv_parser(sub) -> None:
    p = sub.add_parser("tpv", help="test prediction variance of checkpoints under quantization, pruning, SGD or label noise")
    p.add_argument("checkpoints", nargs="+", help="a folder, a glob, or checkpoint files")
    p.add_argument("--model", action="append", default=[],
                   help="MODULE:FACTORY returning the nn.Module; repeat once per checkpoint to compare architectures")
    p.add_argument("--data", required=True, help="training data spec; only its inputs are used (labels only for sgd curvature=hessian)")
    p.add_argument("--test-data", default=None, help="data spec whose test split's inputs give the test TPV (labels never read)")
    p.add_argument("--noise", required=True,
                   help="quant:8 | quant:4:channel | quant:8:global | iso:1e-3 | sgd:lr=0.1,batch=128[,curvature=hessian] | label:0.1 | prune:0.3")
    p.add_argument("--method", default="trace", choices=["trace", "monte_carlo", "exact"])
    p.add_argument("--probes", type=int, default=None, help="probes per input (trace) or draws (monte_carlo)")
    p.add_argument("--inputs", type=int, default=512, help="how many inputs to draw from each split")
    p.add_argument("--outputs", default="logits", choices=["logits", "probs", "log_probs"])
    p.add_argument("--skip", action="append", default=[], help="module kept in full precision under quantization ('head' = the classifier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="tpv.csv", help="results CSV, one row per checkpoint; rerunning skips those done")
    p.add_argument("--plot", default=None, help="PNG path (default with --test-data: next to --out)")
    p.add_argument("--rank", action="store_true", help="list checkpoints from lowest to highest TPV instead of by step")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run_tpv)


def run_tpv(args) -> int:
    from .io.tpv_runner import run_tpv as measure

    run = measure(
        args.checkpoints, args.model, args.data, args.noise, test_data=args.test_data, method=args.method,
        probes=args.probes, inputs=args.inputs, seed=args.seed, outputs=args.outputs, out=args.out, plot=args.plot,
        device=args.device, skip=tuple(args.skip), batch_size=args.batch_size, progress=not args.quiet,
    )
    print(run.describe(rank=args.rank))
    return EXIT_PARTIAL_FAILURE if run.failed else 0
# END tpv subcommand


# ----- prune (issue: pruning) ---------------------------------------------------------------------------
# BEGIN prune subcommand
def add_prune_parser(sub) -> None:
    p = sub.add_parser("prune", help="prune a checkpoint's channels (label-free with jbr) and save it factory-free")
    p.add_argument("checkpoint", help="the trained model's weights (.pt/.pth/.ckpt/.safetensors, loaded without pickle)")
    p.add_argument("--model", required=True, help="MODULE:FACTORY or path/to/file.py:FACTORY returning the nn.Module")
    p.add_argument("--data", required=True, help="calibration data (train split): fashion-mnist[:DIR] | digits | npz:PATH | MODULE:FUNCTION")
    p.add_argument("--criterion", default="jbr",
                   help="jbr (label-free, default), l1, bn_scale, fpgm, whc, random; with labels: jacobian, taylor, hessian")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction to remove, strictly between 0 and 1")
    p.add_argument("--target", default="channels", choices=["channels", "params", "macs"], help="what --ratio counts")
    p.add_argument("--steps", type=int, default=10, help="pruning rounds; data-driven criteria rescore before each")
    p.add_argument("--global", dest="global_pruning", action="store_true", help="rank channels across layers")
    p.add_argument("--confidence", type=float, default=0.9, help="jbr keeps samples whose max probability exceeds this")
    p.add_argument("--calibration-size", type=int, default=1024, help="training samples used to score channels")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--no-bn-recalibration", dest="recalibrate_bn", action="store_false",
                   help="keep the BatchNorm statistics instead of re-estimating them after each step")
    p.add_argument("--finetune-steps", type=int, default=0,
                   help="SGD steps after pruning, matching the unpruned model's predictions (label-free)")
    p.add_argument("--finetune-lr", type=float, default=0.01)
    p.add_argument("--test-data", default=None, help="labelled data spec whose test split is used to report accuracy")
    p.add_argument("--test-size", type=int, default=2000, help="test images used for the accuracy column")
    p.add_argument("--head", default=None, help="qualified name of the classifier head (default: found automatically)")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME", help="a layer not to prune (repeatable)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration subset and fine-tuning batches")
    p.add_argument("-o", "--output", default="pruned.safetensors",
                   help="the pruned model: a safetensors file that valfree.pruning.load_pruned reads without the factory")
    p.set_defaults(func=run_prune)


def run_prune(args) -> int:
    from .io.prune_runner import prune_checkpoint

    result = prune_checkpoint(
        args.checkpoint, model_spec=args.model, data_spec=args.data, output=args.output, criterion=args.criterion,
        ratio=args.ratio, steps=args.steps, target=args.target, test_data=args.test_data, test_size=args.test_size,
        global_pruning=args.global_pruning, confidence=args.confidence, calibration_size=args.calibration_size,
        batch_size=args.batch_size, recalibrate_bn=args.recalibrate_bn, finetune_steps=args.finetune_steps,
        finetune_lr=args.finetune_lr, head=args.head, ignored_layers=args.ignore, device=args.device, seed=args.seed,
    )
    print(result.table())
    kept = "" if result.kept_fraction is None else f"; {100 * result.kept_fraction:.1f}% of calibration samples above --confidence"
    print(f"{result.criterion}: removed {100 * result.removed('params'):.1f}% of params and "
          f"{100 * result.removed('macs'):.1f}% of MACs{kept}")
    print(f"wrote {args.output}")
    return 0
# END prune subcommand


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="valfree",
        description="Model selection without validation labels: head-gradient probe, TPV, label-free pruning.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, value in list(globals().items()):
        if name.startswith("add_") and name.endswith("_parser") and callable(value):
            value(sub)
    return parser


def _version() -> str:
    from . import __version__

    return __version__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValfreeError as exc:
        print(f"valfree {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"valfree {args.command}: interrupted; results written so far are kept.", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
