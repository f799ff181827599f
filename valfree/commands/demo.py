"""``valfree demo``: label-free checkpoint selection, end to end, in a few minutes on a laptop CPU.

Trains a small CNN (Fashion-MNIST when its files are installed, otherwise scikit-learn digits),
saves a checkpoint every quarter epoch, scores them with the head-gradient probe on a fixed batch of
*training* images, selects one with the universal preset, and prints the choice next to every
checkpoint's true test accuracy. The test labels are read only for that display and the report.
"""

from __future__ import annotations

import csv
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .arguments import add_out, add_quiet, at_least, nonnegative_int, positive_int, progress_bar
from .preflight import check_output_dir

if TYPE_CHECKING:  # torch loads when the demo runs, not when the CLI starts
    from torch import nn


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a small CNN, save checkpoints, select one without labels, write a report",
                       description="Train a small CNN, save a checkpoint every quarter epoch, score them without "
                                   "labels, select one, and compare the choice with every checkpoint's test accuracy.")
    add_out(p, "valfree-demo", "folder for checkpoints, scores and the report")
    p.add_argument("--data", default=None, help="fashion-mnist[:DIR] or digits (default: fashion-mnist if its files are present, else digits)")
    p.add_argument("--epochs", type=positive_int, default=None, help="training epochs (default: 6 on Fashion-MNIST, 30 on digits)")
    p.add_argument("--train-size", type=at_least(2), default=None,
                   help="training images used (default: 12000 on Fashion-MNIST, all of digits)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the subset, the initialisation and the batches")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_output_dir(args.out, "--out")
    return run_demo(out=args.out, data=args.data, epochs=args.epochs, train_size=args.train_size, seed=args.seed,
                    quiet=args.quiet)


def accuracy(model: nn.Module, dataset, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode (used for display and evaluation only, never to choose)."""
    import torch
    from torch.utils.data import DataLoader

    was_training = model.training
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in DataLoader(dataset, batch_size=batch_size):
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    model.train(was_training)
    return correct / max(total, 1)


def train_with_checkpoints(model: nn.Module, dataset, out_dir: str | Path, epochs: int, batch_size: int = 128,
                           lr: float = 0.05, weight_decay: float = 5e-4, checkpoints_per_epoch: int = 4,
                           seed: int = 0, log=print) -> list[Path]:
    """SGD with momentum and a cosine schedule; a state_dict every 1/checkpoints_per_epoch epoch."""
    import torch
    from torch import nn
    from torch.utils.data import DataLoader

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed))
    steps_per_epoch = len(loader)
    total = epochs * steps_per_epoch
    every = max(1, steps_per_epoch // checkpoints_per_epoch)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    loss_fn = nn.CrossEntropyLoss()
    saved, step, start = [], 0, time.perf_counter()
    model.train()
    for epoch in range(epochs):
        running = 0.0
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            running += loss.item()
            if step % every == 0 or step == total:
                path = out / f"step_{step:06d}.pt"
                torch.save(model.state_dict(), path)
                saved.append(path)
        log(f"epoch {epoch + 1}/{epochs}: train loss {running / steps_per_epoch:.3f} ({time.perf_counter() - start:.0f}s)")
    return saved


def clear_previous_demo(ckpt_dir: Path, scores_csv: Path) -> None:
    """Remove what an earlier demo wrote there: its checkpoints and its scores. The demo retrains from
    scratch, and the new files (same steps, new modification times) would otherwise be scored next to
    the old rows, giving the selection two rows per step. Only the demo's own file names are removed."""
    import shutil

    from ..io.predictions import sidecar_path
    from ..io.results import ResultsStore

    for old in ckpt_dir.glob("step_*.pt"):
        old.unlink()
    ResultsStore.remove(scores_csv)
    shutil.rmtree(sidecar_path(scores_csv), ignore_errors=True)


def run_demo(out: str = "valfree-demo", data: str | None = None, epochs: int | None = None,
             train_size: int | None = None, seed: int = 0, quiet: bool = False) -> int:
    import torch
    from torch.utils.data import Subset

    from ..io.checkpoints import load_into
    from ..io.data import fashion_mnist_available, load_dataset
    from ..models import cnn
    from .report import write_report
    from .score import score_checkpoints
    from .select import choose

    torch.manual_seed(seed)
    if data is None:
        data = "fashion-mnist" if fashion_mnist_available() else "digits"
        if data == "digits":
            print("Fashion-MNIST files not found (apt-get install dataset-fashion-mnist); using scikit-learn digits.")
    fmnist = data.startswith("fashion-mnist")
    in_size = 28 if fmnist else 8
    factory = "valfree.models:cnn" if fmnist else "valfree.models:digits_cnn"
    epochs = epochs or (6 if fmnist else 30)
    train = load_dataset(data, "train")
    test = load_dataset(data, "test")
    train_size = train_size or (12000 if fmnist else len(train))
    train = Subset(train, torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))[:train_size].tolist())
    test = Subset(test, range(min(len(test), 5000)))
    out_dir = Path(out)
    ckpt_dir = out_dir / "checkpoints"
    scores_csv = out_dir / "scores.csv"
    clear_previous_demo(ckpt_dir, scores_csv)
    print(f"1/4 training a CNN on {len(train)} {data} images for {epochs} epochs -> {ckpt_dir}/")
    model = cnn(in_size=in_size)
    paths = train_with_checkpoints(model, train, ckpt_dir, epochs, batch_size=128 if fmnist else 64, seed=seed)

    print(f"2/4 scoring {len(paths)} checkpoints on one fixed batch of 256 training images (no test data)")
    t0 = time.perf_counter()
    summary = score_checkpoints(str(ckpt_dir), factory, data, scores_csv, batch_size=256, seed=seed, progress=not quiet)
    print(summary.describe() + f" in {time.perf_counter() - t0:.1f}s")

    print(f"3/4 measuring test accuracy of every checkpoint on {len(test)} test images (for display only)")
    metrics_csv = out_dir / "test_accuracy.csv"
    eval_model = cnn(in_size=in_size)
    with open(metrics_csv, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "test_accuracy"])
        for p in progress_bar(paths, quiet, desc="test accuracy", unit="ckpt"):
            writer.writerow([str(p.resolve()), accuracy(load_into(eval_model, p), test)])

    print("4/4 selecting with the default rule: the probe's universal preset (tail 20 %, EMA 3, argmin of the "
          "head-gradient norm), guarded by prediction changes against memorised labels\n")
    rows, steps, scores, choice = choose(str(scores_csv), "grad_norm", "0.2", 3, "min")
    sel = choice.probe
    acc_by_name = {Path(r["path"]).name: float(r["test_accuracy"]) for r in csv.DictReader(open(metrics_csv))}
    accs = [acc_by_name[Path(r["path"]).name] for r in rows]
    oracle = max(range(len(accs)), key=accs.__getitem__)
    last = max(range(len(rows)), key=lambda i: steps[i])
    start, stop = sel.window
    print(f"{'step':>7} {'grad_norm':>10} {'smoothed':>10} {'test acc':>9}")
    for i in sorted(range(len(rows)), key=lambda i: steps[i]):
        tags = [t for t, j in (("chosen", choice.index), ("best on test", oracle), ("last", last)) if i == j]
        print(f"{steps[i]:>7.0f} {scores[i]:>10.4f} {sel.smoothed[i]:>10.4f} {accs[i]:>9.2%}  {', '.join(tags)}")
    report = write_report(scores_csv, out_dir / "report.html", metrics=metrics_csv, title="valfree demo")
    print(f"\nRule {choice.rule}: {choice.reason}.")
    print(
        f"Chosen without labels: step {choice.step:.0f}, test accuracy {accs[choice.index]:.2%}. "
        f"Best on test: step {steps[oracle]:.0f}, {accs[oracle]:.2%} (gap {100 * (accs[oracle] - accs[choice.index]):.2f} points). "
        f"Last checkpoint: {accs[last]:.2%}."
    )
    print(f"Report: {report}")
    print(f"Chosen checkpoint: {rows[choice.index]['path']}")
    return 0
