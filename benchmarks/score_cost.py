"""The cost of prediction changes in ``valfree score``: the share of its time spent predicting the
training subset, per checkpoint and for a whole folder, for the MLP and the demo CNN.

For each model a folder of checkpoints is made by a short training run on Fashion-MNIST (scikit-learn
digits if it is absent; the quality of the training does not matter here). ``valfree score`` then runs
on it through the CLI's own entry (``valfree.cli.main``, in this process, so imports are not timed)
with ``--pred-subset 0`` (no predictions recorded: the probe alone), 512, 2048 (the default) and 4096.
The subset holds the probe batch (256 images) and the probe's forward pass is its first chunk, so the
extra work is a forward pass over the other S - 256 images.

- **per checkpoint**: the time of the loop over the checkpoints (``CheckpointLoop.run``: loading,
  the probe, the predictions, appending the row), divided by N; this leaves out what a call does once
  (reading the data, drawing the subset, building the model) and what it does after the loop
  (recomputing ``pred_change`` from the sidecar);
- **total**: the time of the whole call, as a user sees it (without the Python start-up and imports).

The share of a setting is (its time - the time with ``--pred-subset 0``) / its time. Every repeat runs
all settings, in an order that rotates from repeat to repeat, and the shares are taken within a repeat
and then the median over repeats (the [min, max] beside it). Times are the process's CPU time (the
wall-clock figures are in the JSON).

    python benchmarks/score_cost.py            # 5 repeats; writes the JSON and the table in docs/guide.md
    python benchmarks/score_cost.py --quick    # one repeat, 4 checkpoints, print only
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.integration_overhead import hardware, now, publish, replace_marked, since  # noqa: E402
from valfree.cli import main as cli_main  # noqa: E402
from valfree.commands.checkpoint_loop import CheckpointLoop  # noqa: E402
from valfree.io.data import digits, fashion_mnist, fashion_mnist_available  # noqa: E402
from valfree.models import cnn, mlp  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "score_cost.json"
DOCS = ROOT / "docs" / "guide.md"
BEGIN, END = "<!-- BEGIN score_cost -->", "<!-- END score_cost -->"
SUBSETS = (0, 512, 2048, 4096)
DEFAULT_SUBSET = 2048
TRAIN_IMAGES, BATCH = 4096, 128


def digits_mlp():
    return mlp(in_size=8)


def digits_cnn():
    return cnn(in_size=8)


def data_and_factories() -> tuple[str, object, dict[str, tuple[str, object]]]:
    """(data spec, training set, model name -> (MODULE:FACTORY for ``--model``, the factory))."""
    if fashion_mnist_available():
        return "fashion-mnist", fashion_mnist(split="train", limit=TRAIN_IMAGES), {
            "mlp": ("valfree.models:mlp", mlp), "cnn": ("valfree.models:cnn", cnn)}
    here = Path(__file__).resolve()
    return "digits", digits("train"), {"mlp": (f"{here}:digits_mlp", digits_mlp), "cnn": (f"{here}:digits_cnn", digits_cnn)}


def make_folder(factory, dataset, folder: Path, checkpoints: int, every: int = 4) -> list[Path]:
    """A short SGD run that saves a state_dict every ``every`` steps, ``checkpoints`` of them."""
    torch.manual_seed(0)
    model = factory()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    x, y = dataset.tensors
    folder.mkdir(parents=True, exist_ok=True)
    saved, step = [], 0
    while len(saved) < checkpoints:
        start = (step * BATCH) % (len(x) - BATCH)
        F.cross_entropy(model(x[start: start + BATCH]), y[start: start + BATCH]).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        if step % every == 0:
            path = folder / f"step-{step}.pt"
            torch.save(model.state_dict(), path)
            saved.append(path)
    return saved


@contextlib.contextmanager
def timed_loop(record: list):
    """Time every ``CheckpointLoop.run`` called inside (the loop over the checkpoints) into ``record``."""
    original = CheckpointLoop.run

    def run(self, *args, **kwargs):
        start = now()
        try:
            return original(self, *args, **kwargs)
        finally:
            record.append(since(start))

    CheckpointLoop.run = run
    try:
        yield record
    finally:
        CheckpointLoop.run = original


def score_once(folder: Path, factory: str, data: str, subset: int, work: Path) -> dict:
    """``{"call": (wall, CPU), "loop": (wall, CPU)}`` seconds of one ``valfree score`` call on ``folder``
    into a fresh results file: the whole call, and its loop over the checkpoints."""
    out = work / "scores.csv"
    argv = ["score", str(folder), "--model", factory, "--data", data, "--out", str(out),
            "--pred-subset", str(subset), "--quiet"]
    with timed_loop([]) as loops, contextlib.redirect_stdout(io.StringIO()):
        start = now()
        code = cli_main(argv)
        elapsed = since(start)
    if code != 0 or len(loops) != 1:
        raise RuntimeError(f"valfree {' '.join(argv)} exited with {code}")
    for path in work.iterdir():  # the CSV and its prediction sidecar
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return {"call": elapsed, "loop": loops[0]}


def measure(folder: Path, factory: str, data: str, n: int, subsets, repeats: int, work: Path) -> dict:
    """Every subset size once per repeat, in a rotating order; the shares within each repeat."""
    score_once(folder, factory, data, subsets[-1], work)  # warm-up: kernels, the data files' page cache
    per_repeat = []
    for r in range(repeats):
        times = {}
        for j in range(len(subsets)):
            subset = subsets[(r + j) % len(subsets)]
            times[subset] = score_once(folder, factory, data, subset, work)
        per_repeat.append(times)
    return summarise(per_repeat, n, subsets)


def summarise(per_repeat: list[dict], n: int, subsets) -> dict:
    """Medians over repeats of the per-checkpoint and whole-call times, and the shares of each subset
    size against ``--pred-subset 0`` (taken within each repeat), with their [min, max]."""
    out = {"per_checkpoint_ms": {}, "call_s": {}, "startup_s": {}, "share_per_checkpoint_percent": {},
           "share_total_percent": {}}
    for name, c in (("wall", 0), ("cpu", 1)):
        def med(get) -> dict:
            return {str(s): statistics.median(get(t[s]) for t in per_repeat) for s in subsets}

        out["per_checkpoint_ms"][name] = med(lambda t: 1e3 * t["loop"][c] / n)
        out["call_s"][name] = med(lambda t: t["call"][c])
        out["startup_s"][name] = med(lambda t: t["call"][c] - t["loop"][c])  # before and after the loop
        for key, part in (("share_per_checkpoint_percent", "loop"), ("share_total_percent", "call")):
            cell = {}
            for s in subsets[1:]:
                values = [100 * (t[s][part][c] - t[subsets[0]][part][c]) / t[s][part][c] for t in per_repeat]
                cell[str(s)] = {"median": statistics.median(values), "range": [min(values), max(values)]}
            out[key][name] = cell
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoints", type=int, default=12, help="checkpoints in each model's folder")
    parser.add_argument("--repeats", type=int, default=5, help="repeats of every setting (medians reported)")
    parser.add_argument("--quick", action="store_true", help="one repeat, 4 checkpoints, --pred-subset 0 and 2048; print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    n, repeats = (4, 1) if args.quick else (args.checkpoints, args.repeats)
    subsets = (0, DEFAULT_SUBSET) if args.quick else SUBSETS
    data, dataset, factories = data_and_factories()
    models = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, (factory, build) in factories.items():
            base = Path(tmp) / name
            make_folder(build, dataset, base / "ckpts", n)
            work = base / "work"
            work.mkdir()
            models[name] = {"factory": factory, **measure(base / "ckpts", factory, data, n, subsets, repeats, work)}
    result = {
        "benchmark": "score_cost",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"python benchmarks/score_cost.py --checkpoints {n} --repeats {repeats}",
        "hardware": hardware(),
        "setup": {"data": data, "checkpoints": n, "repeats": repeats, "pred_subsets": list(subsets),
                  "probe_batch": 256, "entry": "valfree.cli.main(['score', ...]) in this process"},
        "models": models,
    }
    return publish(result, RESULTS, None if args.quick else write_docs)


def write_docs(r: dict) -> None:
    """Replace the table between the markers in docs/guide.md."""
    hw, s = r["hardware"], r["setup"]
    rows = []
    for name, m in r["models"].items():
        cpu = m["per_checkpoint_ms"]["cpu"]
        for size in s["pred_subsets"][1:]:
            per, tot = m["share_per_checkpoint_percent"]["cpu"][str(size)], m["share_total_percent"]["cpu"][str(size)]
            rows.append(
                f"| `{m['factory']}` | {size}{' (default)' if size == DEFAULT_SUBSET else ''} | {cpu['0']:.0f} ms | "
                f"{cpu[str(size)]:.0f} ms | {per['median']:.0f} % ({per['range'][0]:.0f} to {per['range'][1]:.0f} %) | "
                f"{tot['median']:.0f} % ({tot['range'][0]:.0f} to {tot['range'][1]:.0f} %) |"
            )
    table = "\n".join([
        BEGIN,
        f"Measured {r['date'][:10]} with `{r['command']}` on a {hw['cpu_count']}-core x86-64 CPU (1-minute load "
        f"average {hw['load_average_1min']} at the end), {hw['threads']} torch thread, torch {hw['torch']}, no GPU: "
        f"folders of {s['checkpoints']} checkpoints of each model, {s['data']}, probe batch {s['probe_batch']}, "
        f"`valfree score` called {s['repeats']} times per setting through the CLI's entry in one process. CPU time; "
        "the share is the extra time over `--pred-subset 0` as a part of the time with it, per checkpoint (the loop "
        "over the checkpoints: loading, probe, predictions, the row) and for the whole call on the folder (reading "
        "the data and drawing the subset included), median over repeats (range).",
        "",
        "| model | `--pred-subset` | per checkpoint, off | per checkpoint, on | share per checkpoint | share of the call |",
        "|---|---|---|---|---|---|",
        *rows,
        END,
    ])
    replace_marked(DOCS, BEGIN, END, table)


if __name__ == "__main__":
    main()
