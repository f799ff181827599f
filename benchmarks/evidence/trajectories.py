"""Train one run and save its checkpoint trajectory, with evaluation metrics per checkpoint.

A run directory under benchmarks/cache/evidence/ holds ``step_XXXXXX.pt`` state dicts and
``trajectory.json``. The JSON is written last and atomically, with the spec's hash, so a rerun skips a
finished run and retrains one that was killed mid-way or whose spec changed.

Per checkpoint it records, for evaluation only, the test accuracy and loss and the labelled
validation-set accuracies (the "practical alternative" selectors read those), and the loss on a fixed
training subset with the labels the model was trained on (a selector a user could run).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .config import CACHE, RunSpec
from .data import RunData, run_data


def run_dir(spec: RunSpec, cache: Path = CACHE) -> Path:
    return cache / spec.name


def read_record(path: Path, spec: RunSpec, **expected) -> dict | None:
    """The cached JSON record at ``path`` if it belongs to ``spec`` (same key) and has every
    ``expected`` field value; None if it is missing, truncated or stale."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    if record.get("key") != spec.key() or any(record.get(k) != v for k, v in expected.items()):
        return None
    return record


def load_trajectory(spec: RunSpec, cache: Path = CACHE) -> dict | None:
    return read_record(run_dir(spec, cache) / "trajectory.json", spec)


def write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, allow_nan=True))
    os.replace(tmp, path)


# Evaluation batch: on one CPU thread the CNN and ResNet evaluate 2-3x faster in batches of 256 than of
# 1000 (measured under load: 0.5-0.9 against 1.5-2.9 ms per image); eval-mode outputs do not depend on it.
EVAL_BATCH = 256


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode. Evaluation only, never used by a label-free selector."""
    was = model.training
    model.eval()
    correct, loss = 0, 0.0
    for i in range(0, len(x), batch_size):
        out = model(x[i : i + batch_size])
        yy = y[i : i + batch_size]
        correct += int((out.argmax(1) == yy).sum())
        loss += float(F.cross_entropy(out, yy, reduction="sum"))
    model.train(was)
    return correct / len(x), loss / len(x)


@torch.no_grad()
def val_accuracies(model: nn.Module, data: RunData, sizes) -> dict:
    """Accuracy and loss of the first k held-out images for each validation size k (nested sets)."""
    was = model.training
    model.eval()
    out = torch.cat([model(data.x_val[i : i + EVAL_BATCH]) for i in range(0, len(data.x_val), EVAL_BATCH)])
    model.train(was)
    hits = (out.argmax(1) == data.y_val).float()
    losses = F.cross_entropy(out, data.y_val, reduction="none")
    row = {}
    for k in sizes:
        row[f"val{k}_acc"] = float(hits[:k].mean())
        row[f"val{k}_loss"] = float(losses[:k].mean())
    return row


def make_optimizer(spec: RunSpec, model: nn.Module, total_steps: int):
    fam, reg = spec.family, spec.regime
    name = reg.optimizer or fam.optimizer
    lr = reg.lr if reg.lr is not None else fam.lr
    if name == "adamw":
        # AdamW's decoupled decay: the regime's SGD-scale weight decay, scaled up as is usual for AdamW.
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=100 * reg.weight_decay)
    elif name == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=reg.weight_decay)
    elif name == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=reg.weight_decay)
    else:
        raise ValueError(f"unknown optimizer {name!r}")
    if reg.schedule == "cosine":
        lam = lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))  # noqa: E731
    elif reg.schedule == "constant":
        lam = lambda s: 1.0  # noqa: E731
    elif reg.schedule == "step":
        lam = lambda s: 1.0 if s < 0.5 * total_steps else (0.1 if s < 0.75 * total_steps else 0.01)  # noqa: E731
    else:
        raise ValueError(f"unknown schedule {reg.schedule!r}")
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lam)


def training_steps(spec: RunSpec, model: nn.Module, data, opt, sched, label_smoothing: float = 0.0):
    """Train ``model`` for ``spec.regime.epochs`` shuffled epochs (seeded by ``spec.seed``), yielding
    (step, loss) after each optimizer step, so that a caller can checkpoint between steps."""
    n = len(data.x_train)
    g = torch.Generator().manual_seed(spec.seed)
    step = 0
    model.train()
    for _ in range(spec.regime.epochs):
        perm = torch.randperm(n, generator=g)
        for b in range(n // spec.batch_size):
            idx = perm[b * spec.batch_size : (b + 1) * spec.batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx], label_smoothing=label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            yield step, float(loss.detach())


@torch.no_grad()
def predicted_classes(model: nn.Module, x: torch.Tensor, batch_size: int = EVAL_BATCH) -> torch.Tensor:
    """Argmax classes in eval mode (int16), in batches."""
    was = model.training
    model.eval()
    out = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was)
    return out.to(torch.int16)


def load_predictions(spec: RunSpec, cache: Path = CACHE) -> dict | None:
    """The run's predictions.npz as plain arrays (steps, pred, index, given, true), or None."""
    import numpy as np

    path = run_dir(spec, cache) / "predictions.npz"
    if not path.exists() or load_trajectory(spec, cache) is None:
        return None
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def checkpoint_steps(total_steps: int, count: int) -> list[int]:
    """``count`` steps spread evenly over training, the last one the final step."""
    steps = sorted({max(1, round(total_steps * (i + 1) / count)) for i in range(count)})
    return steps


class RunLocked(RuntimeError):
    """Another live process is training this run (several runners may share one cache)."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(lock: Path) -> bool:
    """Create ``lock`` holding our pid; take over a lock whose process is gone. False if held."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _pid_alive(pid):
                return False
            lock.unlink(missing_ok=True)  # stale: its process died mid-run
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def lock_path(spec: RunSpec, cache: Path = CACHE) -> Path:
    return cache / ".locks" / f"{spec.name}.lock"


class run_lock:
    """Hold the run's lock for a block (training and scoring); raises :class:`RunLocked` if it is held."""

    def __init__(self, spec: RunSpec, cache: Path = CACHE):
        self.path = lock_path(spec, cache)

    def __enter__(self):
        if not _claim(self.path):
            raise RunLocked(self.path.stem)
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)
        return False


def train_run(spec: RunSpec, cache: Path = CACHE, log=print, locked: bool = False) -> dict:
    """Train ``spec`` (or reuse its cached trajectory) and return the trajectory record.

    Raises :class:`RunLocked` when another live process holds the run (``locked=True``: the caller
    already holds it, see :class:`run_lock`)."""
    cached = load_trajectory(spec, cache)
    if cached is not None:
        return cached
    if locked:
        return _train(spec, cache, log)
    with run_lock(spec, cache):
        return _train(spec, cache, log)


def _train(spec: RunSpec, cache: Path, log) -> dict:
    cached = load_trajectory(spec, cache)  # finished by another process while we waited for the lock
    if cached is not None:
        return cached
    out = run_dir(spec, cache)
    if out.exists():
        shutil.rmtree(out)  # a killed or outdated run: start it again from scratch
    out.mkdir(parents=True)
    data = run_data(spec)
    torch.manual_seed(spec.seed)
    model = spec.family.build(data.in_size)
    n = len(data.x_train)
    steps_per_epoch = n // spec.batch_size
    total = spec.regime.epochs * steps_per_epoch
    save_at = set(checkpoint_steps(total, spec.checkpoints))
    opt, sched = make_optimizer(spec, model, total)
    rows, t_train, t_eval, t_pred, cpu_pred = [], 0.0, 0.0, 0.0, 0.0
    x_pred = data.x_train[data.pred_index]
    preds = []
    cpu_start = time.process_time()  # CPU time of the whole loop (training and evaluation), load-independent
    running, running_n = 0.0, 0
    t0 = time.perf_counter()
    for step, loss in training_steps(spec, model, data, opt, sched):
        running += loss
        running_n += 1
        if step not in save_at:
            continue
        t_train += time.perf_counter() - t0
        t1 = time.perf_counter()
        path = out / f"step_{step:06d}.pt"
        torch.save(model.state_dict(), path)
        test_acc, test_loss = evaluate(model, data.x_test, data.y_test)
        train_acc, train_loss = evaluate(model, data.x_train_eval, data.y_train_eval)
        row = {
            "step": step, "epoch": step / steps_per_epoch, "path": path.name,
            "test_acc": test_acc, "test_loss": test_loss,
            "train_acc": train_acc, "train_loss": train_loss,
            "running_train_loss": running / max(running_n, 1),
            "lr": opt.param_groups[0]["lr"],
            **val_accuracies(model, data, spec.val_sizes),
        }
        t2, c2 = time.perf_counter(), time.process_time()
        preds.append(predicted_classes(model, x_pred))
        t_pred += time.perf_counter() - t2
        cpu_pred += time.process_time() - c2
        rows.append(row)
        running, running_n = 0.0, 0
        t_eval += time.perf_counter() - t1
        t0 = time.perf_counter()
    t_train += time.perf_counter() - t0
    if len(rows) != len(save_at):
        raise RuntimeError(f"{spec.name}: saved {len(rows)} checkpoints, expected {len(save_at)}")
    import numpy as np

    # Written before trajectory.json, the "run complete" marker: plain int arrays, no pickle.
    np.savez(
        out / "predictions.npz",
        steps=np.array([r["step"] for r in rows], dtype=np.int64),
        pred=torch.stack(preds).numpy().astype(np.int16),
        index=data.pred_index.numpy().astype(np.int64),
        given=data.y_train[data.pred_index].numpy().astype(np.int64),
        true=data.y_train_clean[data.pred_index].numpy().astype(np.int64),
    )
    record = {
        "key": spec.key(), "name": spec.name, "spec": spec.as_dict(),
        "family": spec.family.name, "regime": spec.regime.name, "seed": spec.seed,
        "params": sum(p.numel() for p in model.parameters()),
        "train_images": n, "test_images": len(data.x_test), "total_steps": total,
        "train_seconds": t_train, "eval_seconds": t_eval, "cpu_seconds": time.process_time() - cpu_start, "checkpoints": rows,
        # The prediction pass on the recorded subset (part of eval_seconds / cpu_seconds), for its cost.
        "pred_seconds": t_pred, "pred_cpu_seconds": cpu_pred, "pred_subset": len(data.pred_index),
        "torch_threads": torch.get_num_threads(),
    }
    write_json_atomic(out / "trajectory.json", record)
    best = max(r["test_acc"] for r in rows)
    log(f"{spec.name}: trained {total} steps in {t_train:.0f}s (+{t_eval:.0f}s eval); "
        f"test acc best {best:.3f}, last {rows[-1]['test_acc']:.3f}")
    return record
