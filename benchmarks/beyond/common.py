"""What the four beyond-classification benchmarks share: paths, the machine line, the summary
statistics of a probe trajectory against a held-out metric, the JSON result and its plot.

The summary is evaluation only: correlations (Pearson, Spearman, Kendall) of each probe column with
the held-out metric, and the checkpoint that the universal preset (tail 20 %, EMA span 3) picks with
``mode="min"`` and with ``mode="max"``, each with its gap to the oracle.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from valfree.selection import correlations, gap_to_oracle, select_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / "benchmarks" / "cache" / "beyond"
RESULTS = ROOT / "benchmarks" / "results"
IMG = ROOT / "docs" / "img"
PROBE_COLUMNS = ("grad_norm", "score_w", "score_z")


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} CPU threads, torch {torch.__version__}, {torch.get_num_threads()} torch threads"


def set_threads() -> None:
    """One torch thread per benchmark process: the 2 shared cores run two benchmarks side by side."""
    torch.set_num_threads(int(os.environ.get("VALFREE_BENCH_THREADS", "1")))


def summarise(steps, probes: dict[str, list[float]], metric: list[float], higher_is_better: bool,
              tail: float = 0.2, ema: float = 3) -> dict:
    """Correlations and the tail-window choice (min and max) of every probe column against ``metric``."""
    out = {}
    for column, values in probes.items():
        entry = {"correlation": correlations(values, metric).as_dict()}
        for mode in ("min", "max"):
            sel = select_checkpoint(steps, values, tail=tail, ema=ema, mode=mode)
            entry[f"select_{mode}"] = {
                "step": sel.step,
                "metric": float(metric[sel.index]),
                "gap_to_oracle": gap_to_oracle(sel.index, metric, higher_is_better),
            }
        out[column] = entry
    y = np.asarray(metric, dtype=float)
    best = int(np.nanargmax(y) if higher_is_better else np.nanargmin(y))
    order = np.argsort(np.asarray(steps, dtype=float))
    start = len(order) - max(1, int(np.ceil(tail * len(order) - 1e-9)))
    window = [int(i) for i in order[start:]]
    out["oracle"] = {"step": float(steps[best]), "metric": float(y[best])}
    out["last"] = {"step": float(steps[order[-1]]), "metric": float(y[order[-1]]),
                   "gap_to_oracle": gap_to_oracle(int(order[-1]), metric, higher_is_better)}
    window_best = max(window, key=lambda i: y[i]) if higher_is_better else min(window, key=lambda i: y[i])
    out["tail_window_oracle"] = {"step": float(steps[window_best]), "metric": float(y[window_best]),
                                 "gap_to_oracle": gap_to_oracle(window_best, metric, higher_is_better)}
    return out


def write_result(task: str, record: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"beyond_{task}.json"
    record = {"task": task, "machine": machine(), "finished": time.strftime("%Y-%m-%d %H:%M:%S"), **record}
    path.write_text(json.dumps(record, indent=1, allow_nan=True))
    return path


def plot(task: str, steps, probe: list[float], metrics: dict[str, list[float]], title: str, probe_label="grad_norm") -> Path:
    """The probe and each held-out metric against the step, one panel each, sharing the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    IMG.mkdir(parents=True, exist_ok=True)
    fig, axes = plt.subplots(1 + len(metrics), 1, figsize=(6, 2.2 * (1 + len(metrics))), sharex=True)
    axes[0].plot(steps, probe, "o-", ms=3, color="tab:blue")
    axes[0].set_ylabel(probe_label)
    axes[0].set_title(title, fontsize=10)
    for ax, (name, values) in zip(axes[1:], metrics.items()):
        ax.plot(steps, values, "o-", ms=3, color="tab:red")
        ax.set_ylabel(name)
    n = len(steps)
    start = steps[n - max(1, int(np.ceil(0.2 * n - 1e-9)))]
    for ax in axes:
        ax.axvspan(start, steps[-1], color="0.9", zorder=0)
    axes[-1].set_xlabel("training step (grey: tail window, last 20 %)")
    fig.tight_layout()
    path = IMG / f"beyond_{task}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.marks = {}

    def mark(self, name: str) -> None:
        self.marks[name] = round(time.perf_counter() - self.t0, 1)


def train_with_checkpoints(model, loss_fn, tensors: tuple, steps: int, batch_size: int, lr: float,
                           checkpoints: int, out_dir: Path, seed: int = 0, log=print) -> list[tuple[int, Path]]:
    """AdamW with a cosine schedule for ``steps`` steps on shuffled batches of ``tensors``; saves
    ``checkpoints`` evenly spaced state dicts. ``loss_fn(model, *batch)`` returns the training loss.
    A finished run (``done.json`` with the same settings) is reused instead of retrained."""
    out_dir.mkdir(parents=True, exist_ok=True)
    key = {"steps": steps, "batch_size": batch_size, "lr": lr, "checkpoints": checkpoints, "seed": seed,
           "n": len(tensors[0]), "model": type(model).__name__}
    done = out_dir / "done.json"
    every = max(1, steps // checkpoints)
    save_at = [s for s in range(every, steps + 1, every)][-checkpoints:]
    paths = [(s, out_dir / f"step_{s:06d}.pt") for s in save_at]
    if done.exists() and json.loads(done.read_text()) == key and all(p.exists() for _, p in paths):
        log(f"reusing {len(paths)} checkpoints in {out_dir}")
        return paths
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * min(s, steps) / steps)))
    n = len(tensors[0])
    perm, pos, t0 = torch.randperm(n, generator=g), 0, time.perf_counter()
    model.train()
    for step in range(1, steps + 1):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos:pos + batch_size]
        pos += batch_size
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model, *(t[idx] for t in tensors))
        loss.backward()
        opt.step()
        sched.step()
        if step in save_at:
            torch.save(model.state_dict(), out_dir / f"step_{step:06d}.pt")
            log(f"step {step}/{steps}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f}s)")
    done.write_text(json.dumps(key))
    return paths
