"""Overhead of the Monitor's two modes, as a share of a training step and of an epoch, for the demo CNN.

The demo CNN (``valfree.models.cnn()``) trains on Fashion-MNIST (1x28x28, batch 128, 12000 training
images = 94 steps per epoch, as ``valfree demo`` does; scikit-learn digits if Fashion-MNIST is absent).
Everything is measured in the same run, so only ratios are reported:

- piggyback: the time of ``monitor.step(step, targets=y)`` (the closed-form probe from the captured
  head input and output), taken inside the training loop, divided by the time of a plain training
  step; also the median difference between paired steps with and without the probe;
- fixed batch: the time of one probe in eval mode, times the probes per epoch at ``every=100``,
  divided by the time of an epoch (94 plain steps); for probe batches of 32, 64, 128 and 256 images
  (64 is the paper's probe batch, 256 the default of ``valfree score``).

Targets: piggyback under 1 % of a step; fixed batch every 100 steps under 0.1 % of an epoch.

Prediction changes (Label Wave), for the demo CNN and the MLP (``valfree.models.mlp()``), timed in
blocks that interleave training steps with the tracking:

- fixed subset: ``PredictionTracker.measure`` (one eval-mode forward over the subset, in chunks of
  256, as the integrations build it) for each subset size, divided by the training between two
  checks at each integration's default cadence: the Monitor's ``every=100`` steps, Lightning's one
  check per epoch and the Hugging Face Trainer's default ``save_steps=500``, on a realistic epoch
  (Fashion-MNIST's 60000 images at batch 128 = 469 steps); the subset each one uses by default is
  read from the code (the Monitor's after one ``step(batch=...)``; the callbacks size theirs the
  same way from their cadence), and the size :func:`valfree.integrations.prediction_tracking.training_pred_subset`
  gives at their cadence is shown beside it;
- piggyback: ``PredictionTracker.observe`` on each training batch (right after its backward, as the
  Monitor calls it) plus ``flush`` at each check, divided by the step time.

Target: the default tracking under 1 % of training time.

    python benchmarks/integration_overhead.py            # 3 rounds; writes the JSON and the docs table
    python benchmarks/integration_overhead.py --only predictions   # only the prediction-change part
    python benchmarks/integration_overhead.py --quick    # one short round, prints only

Times are taken with both the wall clock and the process's CPU clock. On a machine shared with other
jobs the CPU clock counts this process's work and not its waits for a core, so its ratios are the
ones reported; the wall-clock ratios are written beside them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import valfree  # noqa: E402
from valfree.integrations.prediction_tracking import PredictionTracker, training_pred_subset  # noqa: E402
from valfree.io.data import digits, fashion_mnist, fashion_mnist_available, probe_batch  # noqa: E402
from valfree.models import cnn, mlp  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "integration_overhead.json"
DOCS = ROOT / "docs" / "integrations.md"
BEGIN, END = "<!-- BEGIN integration_overhead -->", "<!-- END integration_overhead -->"
BATCH, TRAIN_IMAGES, EVERY = 128, 12000, 100
PROBE_BATCHES = (32, 64, 128, 256)
# Prediction changes: the subset sizes timed, and a realistic epoch (Fashion-MNIST's 60000 training
# images at batch 128) for the cadences that count in epochs.
PC_SUBSETS = (256, 512, 1024, 2048)
EPOCH_STEPS = -(-60000 // BATCH)
HF_SAVE_STEPS = 500  # transformers.TrainingArguments' default save_steps
PC_TARGET_PERCENT = 1.0


def load_data():
    if fashion_mnist_available():
        return "fashion-mnist", fashion_mnist(split="train", limit=TRAIN_IMAGES), 28
    return "digits", digits("train"), 8


def bootstrap_median_ci(values: list[float], draws: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile-bootstrap interval of the median."""
    import random

    rng = random.Random(seed)
    medians = sorted(statistics.median(rng.choices(values, k=len(values))) for _ in range(draws))
    return medians[int(0.025 * draws)], medians[int(0.975 * draws) - 1]


def now() -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process). On a shared machine the CPU clock counts the work
    done and not the time spent waiting for a core, so other jobs' load distorts its ratios less."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    wall, cpu = now()
    return wall - start[0], cpu - start[1]


def medians(pairs: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(p[0] for p in pairs), statistics.median(p[1] for p in pairs)


def measure_round(model, opt, batches, dataset, steps: int, fixed_repeats: int, steps_per_epoch: int) -> dict:
    """One round: paired plain/probed training steps, then fixed-batch probes of every size."""

    def forward_backward(i: int):
        x, y = batches[i % len(batches)]
        F.cross_entropy(model(x), y).backward()
        return y

    def update() -> None:
        opt.step()
        opt.zero_grad(set_to_none=True)

    for i in range(10):  # warm-up: allocator, kernels, BatchNorm
        forward_backward(i)
        update()

    # Pairs of steps with and without the probe, in alternating order (plain first on even pairs,
    # probed first on odd ones) so that order effects and load drifts cancel. The Monitor stays
    # attached throughout, as in real use; its hook only keeps two references per forward.
    plain, piggy, probe_only = [], [], []
    monitor = valfree.Monitor(model, piggyback=True, every=1)
    for i in range(steps):
        for probed in ((False, True) if i % 2 == 0 else (True, False)):
            start = now()
            y = forward_backward(2 * i + probed)
            if probed:
                mid = now()
                monitor.step(i + 1, targets=y)
                probe_only.append(since(mid))
            update()
            (piggy if probed else plain).append(since(start))
    monitor.close()
    step_wall, step_cpu = medians(plain)
    probe_wall, probe_cpu = medians(probe_only)
    diff_wall = [p[0] - q[0] for p, q in zip(piggy, plain)]
    diff_cpu = [p[1] - q[1] for p, q in zip(piggy, plain)]

    # Fixed batch: one eval-mode probe every 100 steps, for several probe-batch sizes.
    probes_per_epoch = steps_per_epoch / EVERY
    fixed_results = {}
    for size_ in PROBE_BATCHES:
        fixed = valfree.Monitor(model, probe_batch=probe_batch(dataset, size_, seed=0), every=EVERY)
        fixed.probe()
        runs = []
        for _ in range(fixed_repeats):
            start = now()
            fixed.probe()
            runs.append(since(start))
        wall, cpu = medians(runs)
        fixed_results[str(size_)] = {
            "probe_ms_cpu": 1e3 * cpu,
            "probe_ms_wall": 1e3 * wall,
            # One probe per `every` steps: the share of an epoch is probe / (every x step), whatever its length.
            "percent_of_epoch_cpu": 100 * probes_per_epoch * cpu / (steps_per_epoch * step_cpu),
            "percent_of_epoch_wall": 100 * probes_per_epoch * wall / (steps_per_epoch * step_wall),
            "every_for_0.1_percent": math.ceil(cpu / (0.001 * step_cpu)),  # from the CPU-time ratio
        }
    return {
        "step_ms_cpu": 1e3 * step_cpu,
        "step_ms_wall": 1e3 * step_wall,
        "timed_step_pairs": len(plain),
        "piggyback": {
            "probe_ms_cpu": 1e3 * probe_cpu,
            "probe_ms_wall": 1e3 * probe_wall,
            "percent_of_step_cpu": 100 * probe_cpu / step_cpu,  # one probe per step: also the share of an epoch
            "percent_of_step_wall": 100 * probe_wall / step_wall,
            "paired_difference_percent_cpu": 100 * statistics.median(diff_cpu) / step_cpu,
            "paired_difference_ci95_cpu": [100 * v / step_cpu for v in bootstrap_median_ci(diff_cpu)],
            "paired_difference_percent_wall": 100 * statistics.median(diff_wall) / step_wall,
            "paired_difference_ci95_wall": [100 * v / step_wall for v in bootstrap_median_ci(diff_wall)],
        },
        "fixed_batch": fixed_results,
    }


def default_cadences(model, batches) -> list[dict]:
    """Each integration's default check cadence (in steps of BATCH) and the prediction subset it uses
    by default, read from the code; with the size ``training_pred_subset`` gives at that cadence."""
    monitor = valfree.Monitor(model, every=EVERY)
    monitor.step(1, batch=batches[0])  # the first batch tells the Monitor the batch size
    monitor_subset = monitor.measurer.pred_subset
    monitor.close()
    # Lightning and HF size their default as the Monitor does, from the inputs trained between checks
    # (lightning_checks._trained_per_check, huggingface._trained_per_save on one device).
    return [
        {"integration": "Monitor", "cadence": f"every={EVERY} steps", "steps_per_check": EVERY,
         "subset": monitor_subset},
        {"integration": "Lightning", "cadence": f"every epoch ({EPOCH_STEPS} steps)", "steps_per_check": EPOCH_STEPS,
         "subset": training_pred_subset(EPOCH_STEPS * BATCH)},
        {"integration": "Hugging Face", "cadence": f"save_steps={HF_SAVE_STEPS}", "steps_per_check": HF_SAVE_STEPS,
         "subset": training_pred_subset(HF_SAVE_STEPS * BATCH)},
    ]


def measure_predictions(models: dict, batches, x_pc, y_pc, sizes, repeats: int, block: int = 8) -> dict:
    """Prediction-change tracking against training, per model: ``repeats`` blocks, each of ``block``
    training steps (each followed by a timed ``observe`` of its batch, as piggyback does) and then one
    ``measure`` of every subset size (in an order that rotates from block to block), so that the
    step times and the measurements share the machine's state."""
    out = {}
    for name, (model, opt) in models.items():
        trackers = {n: PredictionTracker(x_pc[:n], y_pc[:n], batch_size=256) for n in sizes}
        piggy = PredictionTracker()
        for n in sizes:
            trackers[n].measure(model)  # warm-up
        for x, y in batches[:3]:
            F.cross_entropy(model(x), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        steps, observe, flush, measure = [], [], [], {n: [] for n in sizes}
        for r in range(repeats):
            for i in range(block):
                k = (r * block + i) % len(batches)
                x, y = batches[k]
                ids = torch.arange(k * BATCH, k * BATCH + len(y))
                start = now()
                logits = model(x)
                F.cross_entropy(logits, y).backward()
                mid = now()
                piggy.observe(ids, logits, y)
                seen = since(mid)
                opt.step()
                opt.zero_grad(set_to_none=True)
                total = since(start)
                observe.append(seen)
                steps.append((total[0] - seen[0], total[1] - seen[1]))
            start = now()
            piggy.flush()
            flush.append(since(start))
            for j in range(len(sizes)):
                n = sizes[(r + j) % len(sizes)]
                start = now()
                trackers[n].measure(model)
                measure[n].append(since(start))
        step_wall, step_cpu = medians(steps)
        obs_wall, obs_cpu = medians(observe)
        flush_wall, flush_cpu = medians(flush)
        by_size = {}
        for n in sizes:
            wall, cpu = medians(measure[n])
            by_size[str(n)] = {"measure_ms_cpu": 1e3 * cpu, "measure_ms_wall": 1e3 * wall,
                               "steps_cpu": cpu / step_cpu}
        per_input = [(step_cpu / BATCH) / (1e-3 * by_size[str(n)]["measure_ms_cpu"] / n) for n in sizes]
        out[name] = {
            "step_ms_cpu": 1e3 * step_cpu, "step_ms_wall": 1e3 * step_wall, "timed_steps": len(steps),
            "observe_ms_cpu": 1e3 * obs_cpu, "observe_ms_wall": 1e3 * obs_wall,
            "flush_ms_cpu": 1e3 * flush_cpu, "flush_ms_wall": 1e3 * flush_wall,
            "by_subset": by_size,
            # Inputs predicted (eval mode) in the time of training on one: the largest subset's ratio,
            # where fixed costs weigh least.
            "predicted_per_trained": per_input[-1],
        }
    return out


def prediction_shares(pc: dict, cadences: list[dict]) -> list[dict]:
    """The share of training time of each integration's default tracking, per model: the fixed subset
    it uses, the one ``training_pred_subset`` gives at its cadence, and piggyback."""
    rows = []
    for c in cadences:
        every = c["steps_per_check"]
        budgeted = training_pred_subset(every * BATCH)
        row = {**c, "budgeted_subset": budgeted, "fixed_percent_cpu": {}, "budgeted_percent_cpu": {},
               "piggyback_percent_cpu": {}}
        for name, m in pc.items():
            def share(n: int) -> float:
                return 100 * m["by_subset"][str(n)]["measure_ms_cpu"] / (every * m["step_ms_cpu"])
            row["fixed_percent_cpu"][name] = share(c["subset"])
            row["budgeted_percent_cpu"][name] = share(budgeted)
            row["piggyback_percent_cpu"][name] = 100 * (m["observe_ms_cpu"] + m["flush_ms_cpu"] / every) / m["step_ms_cpu"]
        rows.append(row)
    return rows


def combine_rounds(rounds: list[dict]) -> dict:
    """The median over rounds of every number, with the [min, max] of the headline shares beside it.
    A virtual machine's speed drifts over minutes, and with it the step time the shares divide by."""

    def med(get) -> float:
        return statistics.median(get(r) for r in rounds)

    def span(get) -> list[float]:
        return [min(get(r) for r in rounds), max(get(r) for r in rounds)]

    pig = {key: med(lambda r, k=key: r["piggyback"][k]) for key in rounds[0]["piggyback"] if not key.endswith("ci95_cpu") and not key.endswith("ci95_wall")}
    for key in ("percent_of_step_cpu", "probe_ms_cpu", "paired_difference_percent_cpu", "paired_difference_percent_wall"):
        pig[f"{key}_range"] = span(lambda r, k=key: r["piggyback"][k])
    pig["target_percent_of_step"] = 1.0
    fixed = {}
    for size in rounds[0]["fixed_batch"]:
        cell = {key: med(lambda r, k=key: r["fixed_batch"][size][k]) for key in rounds[0]["fixed_batch"][size]}
        cell["every_for_0.1_percent"] = math.ceil(cell["every_for_0.1_percent"])
        cell["percent_of_epoch_cpu_range"] = span(lambda r: r["fixed_batch"][size]["percent_of_epoch_cpu"])
        fixed[size] = cell
    return {
        "step_ms_cpu": med(lambda r: r["step_ms_cpu"]),
        "step_ms_wall": med(lambda r: r["step_ms_wall"]),
        "step_ms_cpu_range": span(lambda r: r["step_ms_cpu"]),
        "piggyback": pig,
        "fixed_batch": {"by_probe_batch": fixed, "target_percent_of_epoch": 0.1},
    }


def combine_predictions(rounds: list[dict]) -> dict:
    """The median over rounds of every per-model time and ratio; the shares of each default cadence
    from those medians, with their [min, max] over rounds."""

    def med_tree(values: list):
        first = values[0]
        if isinstance(first, dict):
            return {k: med_tree([v[k] for v in values]) for k in first}
        return statistics.median(values) if isinstance(first, (int, float)) else first

    by_model = med_tree([r["by_model"] for r in rounds])
    cadences = rounds[0]["cadences"]
    shares = prediction_shares(by_model, cadences)
    per_round = [prediction_shares(r["by_model"], cadences) for r in rounds]
    for i, row in enumerate(shares):
        for key in ("fixed_percent_cpu", "budgeted_percent_cpu", "piggyback_percent_cpu"):
            row[key.replace("_cpu", "_cpu_range")] = {
                name: [min(p[i][key][name] for p in per_round), max(p[i][key][name] for p in per_round)]
                for name in row[key]}
    return {"by_model": by_model, "defaults": shares, "target_percent_of_training": PC_TARGET_PERCENT}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed pairs of training steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of the whole measurement (median and range reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: with more, OpenMP spin-waiting on a shared "
                             "machine inflates both clocks)")
    parser.add_argument("--pc-repeats", type=int, default=10,
                        help="blocks of training steps and prediction-change measurements per round")
    parser.add_argument("--only", choices=("predictions",), default=None,
                        help="measure only the prediction-change part and replace it in the existing JSON")
    parser.add_argument("--quick", action="store_true", help="one round of 40 pairs, print only")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, rounds_n = (40, 1) if args.quick else (args.steps, args.rounds)
    torch.manual_seed(0)
    data_name, dataset, size = load_data()
    x_all, y_all = dataset.tensors
    steps_per_epoch = -(-len(x_all) // BATCH)
    model = cnn(in_size=size)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = [(x_all[i: i + BATCH], y_all[i: i + BATCH]) for i in range(0, BATCH * 16, BATCH)]
    write = None if args.quick else write_docs
    if args.only == "predictions":
        result = json.loads(RESULTS.read_text()) if RESULTS.exists() and not args.quick else {}
        result["prediction_changes"] = prediction_part(args, model, opt, batches, dataset, size, rounds_n)
        return publish(result, RESULTS, write if "piggyback" in result else None)
    rounds = [measure_round(model, opt, batches, dataset, steps, 5 if args.quick else 30, steps_per_epoch)
              for _ in range(rounds_n)]
    result = {
        "benchmark": "integration_overhead",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"python benchmarks/integration_overhead.py --threads {args.threads} --rounds {rounds_n}",
        "hardware": hardware(),
        "setup": {"model": "valfree.models.cnn()", "data": data_name, "batch": BATCH, "train_images": len(x_all),
                  "steps_per_epoch": steps_per_epoch, "probe_batches": list(PROBE_BATCHES), "fixed_every": EVERY,
                  "timed_step_pairs": steps, "rounds": rounds_n},
        **combine_rounds(rounds),
        "rounds": rounds,
    }
    result["epoch_s_cpu"] = steps_per_epoch * result["step_ms_cpu"] / 1e3
    result["prediction_changes"] = prediction_part(args, model, opt, batches, dataset, size, rounds_n)
    return publish(result, RESULTS, write)


def prediction_part(args, model, opt, batches, dataset, size: int, rounds_n: int) -> dict:
    """The prediction-change measurement, with its own date, command and machine load (it can be
    rerun alone with ``--only predictions``)."""
    small = mlp(in_size=size)
    models = {"cnn": (model, opt), "mlp": (small, torch.optim.SGD(small.parameters(), lr=0.05, momentum=0.9))}
    x_pc, y_pc = probe_batch(dataset, max(PC_SUBSETS), seed=0)  # the seeded draw the integrations make
    cadences = default_cadences(model, batches)
    sizes = sorted(set(PC_SUBSETS) | {c["subset"] for c in cadences}
                   | {training_pred_subset(c["steps_per_check"] * BATCH) for c in cadences})
    repeats = 3 if args.quick else args.pc_repeats
    rounds = [{"by_model": measure_predictions(models, batches, x_pc, y_pc, sizes, repeats), "cadences": cadences}
              for _ in range(rounds_n)]
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"python benchmarks/integration_overhead.py --only predictions --threads {args.threads} "
                   f"--rounds {rounds_n}" + (f" --pc-repeats {repeats}" if repeats != 10 else ""),
        "hardware": hardware(),
        "setup": {"models": {"cnn": "valfree.models.cnn()", "mlp": "valfree.models.mlp()"}, "batch": BATCH,
                  "subsets": sizes, "realistic_epoch_steps": EPOCH_STEPS, "hf_save_steps": HF_SAVE_STEPS,
                  "rounds": rounds_n, "blocks": repeats, "steps_per_block": 8},
        **combine_predictions(rounds),
        "rounds": rounds,
    }


def hardware() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
            "load_average_1min": round(os.getloadavg()[0], 2)}


def publish(result: dict, path: Path, write_docs=None) -> dict:
    """Print the result; with ``write_docs`` (not in a quick run) also write the JSON and the docs."""
    print(json.dumps(result, indent=2))
    if write_docs is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
        write_docs(result)
    return result


def replace_marked(path: Path, begin: str, end: str, block: str) -> None:
    """Replace what lies between the ``begin`` and ``end`` markers of a docs page (the markers are in
    ``block``); the rest of the page is prose and stays. A page without them gets them at its end."""
    text = path.read_text() if path.exists() else ""
    if begin not in text:
        text += f"\n{begin}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(head + block + tail)


def write_docs(r: dict) -> None:
    """Replace the table between the markers in docs/integrations.md (the rest of the page is prose)."""
    hw, s, p, f = r["hardware"], r["setup"], r["piggyback"], r["fixed_batch"]
    lo, hi = p["percent_of_step_cpu_range"]
    rows = [
        f"| piggyback, every step | {p['probe_ms_cpu']:.2f} ms | {p['percent_of_step_cpu']:.2f} % of a step "
        f"(= of an epoch; rounds {lo:.2f} to {hi:.2f} %) | {p['percent_of_step_wall']:.2f} % | < 1 % of a step | |",
    ]
    for size, v in f["by_probe_batch"].items():
        lo, hi = v["percent_of_epoch_cpu_range"]
        rows.append(
            f"| fixed batch of {size} images, every {s['fixed_every']} steps | {v['probe_ms_cpu']:.1f} ms | "
            f"{v['percent_of_epoch_cpu']:.3f} % of an epoch (rounds {lo:.3f} to {hi:.3f} %) | "
            f"{v['percent_of_epoch_wall']:.3f} % | < 0.1 % of an epoch | {v['every_for_0.1_percent']} |"
        )
    step_lo, step_hi = r["step_ms_cpu_range"]
    diff_lo, diff_hi = p["paired_difference_percent_cpu_range"]
    wdiff_lo, wdiff_hi = p["paired_difference_percent_wall_range"]
    table = "\n".join([
        BEGIN,
        f"Measured {r['date'][:10]} with `{r['command']}` on a {hw['cpu_count']}-core x86-64 CPU "
        f"(1-minute load average {hw['load_average_1min']} at the end), {hw['threads']} torch thread, torch {hw['torch']}, "
        f"no GPU. Model `{s['model']}` on {s['data']}, batch {s['batch']}, {s['train_images']} training images = "
        f"{s['steps_per_epoch']} steps per epoch; {s['rounds']} rounds of {s['timed_step_pairs']} timed pairs of "
        f"steps, each followed by the fixed-batch probes. Every number is the median over rounds. A plain training "
        f"step took {r['step_ms_cpu']:.0f} ms of CPU time (rounds {step_lo:.0f} to {step_hi:.0f} ms; "
        f"{r['step_ms_wall']:.0f} ms wall), an epoch {r['epoch_s_cpu']:.1f} s of CPU time. Shares are ratios of CPU "
        "time, which counts this process's work and not its waits for a core, so other jobs inflate it less than "
        "the wall clock (they still evict its caches). The wall-clock share is shown beside it. The speed of this "
        "virtual machine drifts over minutes, and a share moves with the step time it divides by.",
        "",
        "| mode | CPU time per probe | share (CPU time) | share (wall clock) | target | `every` for < 0.1 % |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"End to end, the median difference between paired steps with and without the piggyback probe "
        f"was {p['paired_difference_percent_cpu']:+.2f} % of a step in CPU time (rounds {diff_lo:+.2f} to "
        f"{diff_hi:+.2f} %; each round's 95 % bootstrap interval is in the JSON) and "
        f"{p['paired_difference_percent_wall']:+.2f} % in wall time ({wdiff_lo:+.2f} to {wdiff_hi:+.2f} %). "
        "Step-to-step noise is of the order of the cost being measured, which is why the table times the probe itself.",
        *(prediction_docs(r["prediction_changes"]) if "prediction_changes" in r else []),
        END,
    ])
    replace_marked(DOCS, BEGIN, END, table)


def prediction_docs(pc: dict) -> list[str]:
    """The prediction-change rows of the docs: each integration's default as a share of training time."""
    setup, hw = pc["setup"], pc["hardware"]
    models = list(pc["by_model"])
    m = pc["by_model"]
    big = str(max(int(n) for n in m[models[0]]["by_subset"]))

    def cells(row: dict, key: str) -> str:
        return " | ".join(f"{row[key][name]:.2f} % ({row[key + '_range'][name][0]:.2f} to {row[key + '_range'][name][1]:.2f})"
                          for name in models)

    rows = [
        f"| {row['integration']} | {row['cadence']} | {row['subset']} | {cells(row, 'fixed_percent_cpu')} | "
        f"{row['budgeted_subset']} | {cells(row, 'budgeted_percent_cpu')} | {cells(row, 'piggyback_percent_cpu')} |"
        for row in pc["defaults"]
    ]

    def heads(label: str) -> str:
        return " | ".join(f"{label}, {name}" for name in models)

    per_model = "; ".join(
        f"{name} (`{setup['models'][name]}`): a training step {m[name]['step_ms_cpu']:.1f} ms, predicting {big} inputs "
        f"{m[name]['by_subset'][big]['measure_ms_cpu']:.1f} ms ({m[name]['by_subset'][big]['steps_cpu']:.1f} steps; "
        f"{m[name]['predicted_per_trained']:.1f} inputs predicted in the time of training on one), `observe` "
        f"{m[name]['observe_ms_cpu']:.2f} ms per step"
        for name in models)
    return [
        "",
        f"**Prediction changes**, measured {pc['date'][:10]} with `{pc['command']}` (1-minute load average "
        f"{hw['load_average_1min']} at the end), in {setup['rounds']} rounds of {setup['blocks']} blocks of "
        f"{setup['steps_per_block']} training steps (each followed by a timed piggyback `observe` of its batch) "
        f"and one `PredictionTracker.measure` of every subset size; CPU time, median over rounds (range). {per_model}. Each share divides one check's "
        "tracking by the training since the previous check, at the integration's default cadence on a "
        f"{setup['realistic_epoch_steps']}-step epoch (Fashion-MNIST's 60000 images at batch 128). *default "
        "subset*: what the integration predicts at each check as shipped; *budgeted*: what "
        "`training_pred_subset` gives at that cadence; *piggyback*: `observe` on every batch and `flush` at "
        "each check, with no prediction pass.",
        "",
        f"| integration | default cadence | default subset | {heads('default subset')} | budgeted subset | "
        f"{heads('budgeted')} | {heads('piggyback')} |",
        "|---|---|---|" + "---|" * len(models) + "---|" + "---|" * (2 * len(models)),
        *rows,
    ]


if __name__ == "__main__":
    main()
