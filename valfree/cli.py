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
    p.add_argument("--loss", default="ce", choices=["ce", "bce"], help="loss on the head's logits")
    p.add_argument("--targets", default="labels", choices=["labels", "pseudo"],
                   help="'pseudo' uses the model's own argmax, for unlabeled data")
    p.add_argument("--batch-size", type=int, default=256, help="size of the fixed probe batch")
    p.add_argument("--seed", type=int, default=0, help="seed that draws the probe batch")
    p.add_argument("--split", default="train", choices=["train", "test"], help="which split to draw the batch from")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cuda")
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.set_defaults(func=run_score)


def run_score(args) -> int:
    from .io.scoring import score_checkpoints

    summary = score_checkpoints(
        args.checkpoints, model_spec=args.model, data_spec=args.data, out=args.out, head=args.head,
        loss=args.loss, targets=args.targets, batch_size=args.batch_size, seed=args.seed, split=args.split,
        device=args.device, label_smoothing=args.label_smoothing,
    )
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
# END tpv subcommand


# ----- prune (issue: pruning) ---------------------------------------------------------------------------
# BEGIN prune subcommand
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
