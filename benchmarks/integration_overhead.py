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

    python benchmarks/integration_overhead.py            # 3 rounds; writes the JSON and the docs table
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
from valfree.io.data import digits, fashion_mnist, fashion_mnist_available, probe_batch  # noqa: E402
from valfree.models import cnn  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "integration_overhead.json"
DOCS = ROOT / "docs" / "integrations.md"
BEGIN, END = "<!-- BEGIN integration_overhead -->", "<!-- END integration_overhead -->"
BATCH, TRAIN_IMAGES, EVERY = 128, 12000, 100
PROBE_BATCHES = (32, 64, 128, 256)


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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200, help="timed pairs of training steps per round")
    parser.add_argument("--rounds", type=int, default=3, help="repeats of the whole measurement (median and range reported)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: with more, OpenMP spin-waiting on a shared "
                             "machine inflates both clocks)")
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
    rounds = [measure_round(model, opt, batches, dataset, steps, 5 if args.quick else 30, steps_per_epoch)
              for _ in range(rounds_n)]
    result = {
        "benchmark": "integration_overhead",
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": f"python benchmarks/integration_overhead.py --threads {args.threads} --rounds {rounds_n}",
        "hardware": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "torch": torch.__version__, "threads": torch.get_num_threads(), "device": "cpu",
                     "load_average_1min": round(os.getloadavg()[0], 2)},
        "setup": {"model": "valfree.models.cnn()", "data": data_name, "batch": BATCH, "train_images": len(x_all),
                  "steps_per_epoch": steps_per_epoch, "probe_batches": list(PROBE_BATCHES), "fixed_every": EVERY,
                  "timed_step_pairs": steps, "rounds": rounds_n},
        **combine_rounds(rounds),
        "rounds": rounds,
    }
    result["epoch_s_cpu"] = steps_per_epoch * result["step_ms_cpu"] / 1e3
    print(json.dumps(result, indent=2))
    if not args.quick:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(result, indent=2) + "\n")
        write_docs(result)
    return result


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
        END,
    ])
    text = DOCS.read_text() if DOCS.exists() else f"# Training integrations\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text:
        text += f"\n{BEGIN}\n{END}\n"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    DOCS.write_text(head + table + tail)


if __name__ == "__main__":
    main()
