"""Prediction changes piggybacked on the training forward, or measured on a fixed subset: does the
choice of the selection rules change?

    nice -n 10 python benchmarks/piggyback.py                 # every run (resumable); writes the JSON
    nice -n 10 python benchmarks/piggyback.py --families mlp  # only the MLP runs (each call adds to the JSON)

Real training runs: ``valfree.models.mlp()`` and ``valfree.models.cnn(width=16)`` (BatchNorm) on
5000 Fashion-MNIST training images, with clean labels and with 30 % symmetric label noise (exactly
that share of labels replaced by another class), 25 epochs of SGD (lr 0.05 as in the evidence grid,
Nesterov momentum 0.9, cosine decay to zero, batch 128, no weight decay), one thread; 5 seeds for
the MLP, 3 for the CNN. Two ``valfree.Monitor``s watch the same model in the same run, one check per
epoch:

- **fixed**: ``Monitor(model, train_data=train_set, every=steps_per_epoch, total_steps=...)`` fed
  ``step(step, batch=(x, y))``: at each check the model predicts the seeded 2048-image training subset
  in eval mode (the default);
- **piggyback**: the same Monitor fed ``step(step, batch=(x, y), sample_ids=ids, output=logits)`` at
  every training step: each sample's predicted class in the training forward is compared with the
  one it had when it was last seen (a check per epoch: every sample once).

Both probe the same fixed batch (the Monitor's seeded draw), so the two differ only in how
``pred_change`` and ``label_agreement`` are measured. After each check the model's test accuracy is
measured on 5000 test images (evaluation only; no rule reads it).

Per run and mode: the checkpoint each rule chooses over the whole run (the default rule ``guarded``,
and ``label-wave``, which reads prediction changes alone), and the one the online stop restores
(the default rule with patience 10 and the default warm-up, replayed by ``benchmarks/warmup.py``'s
``replay``), each with its gap to the run's best test accuracy in points; and the position of the
Label Wave point (the PC minimum) in each mode.

A change after the first runs, reported rather than hidden: the plan was a constant rate and 3
seeds. The first pass (the MLP, 3 seeds, constant rate) swung by up to 10 points of test accuracy
from one epoch to the next, so every gap mostly measured that swing. The main runs therefore use
cosine decay, the evidence grid's default schedule, and 5 MLP seeds (the MLP is cheap); the
constant-rate runs are kept (``--schedule constant``, regimes named ``-constant``) and count in the
recommendation like the others.

Recommendation rule (written down and committed before any run):

- Per regime (family x labels), the paired difference piggyback - fixed of the default rule's gap,
  mean over seeds. Piggyback is recommended wherever batches carry sample indices if that difference
  is at most 0.5 points in every regime, both over the whole run and with the online stop; otherwise
  the docs recommend the fixed subset for the regimes where it is larger, and say by how much.
- The same difference for ``label-wave`` is reported; it bears on the recommendation for
  ``rule="label-wave"`` only (same 0.5-point threshold).
- The PC minima agree in a run when the two Label Wave points are at most one check apart; the
  share of runs where they agree and the mean distance are reported, not used to decide.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import valfree  # noqa: E402
from valfree.integrations.tracking import DEFAULT_PATIENCE, DEFAULT_WARMUP  # noqa: E402
from valfree.models import cnn, mlp  # noqa: E402
from valfree.selection.rules import DEFAULT_RULE, select_by_rule  # noqa: E402

from benchmarks.evidence.data import split_tensors, symmetric_noise  # noqa: E402
from benchmarks.evidence.trajectories import evaluate  # noqa: E402
from benchmarks.warmup import replay  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "piggyback.json"
DATA = "fashion-mnist"
FAMILIES = {"mlp": lambda: mlp(), "cnn": lambda: cnn(width=16)}
NOISE = {"clean": 0.0, "noisy30": 0.3}
SEEDS = {"mlp": (0, 1, 2, 3, 4), "cnn": (0, 1, 2)}
SCHEDULES = ("cosine", "constant")
TRAIN, TEST, EPOCHS, BATCH, LR = 5000, 5000, 25, 128, 0.05
MODES = ("fixed", "piggyback")
RULES = (DEFAULT_RULE, "label-wave")
THRESHOLD = 0.5  # points: the recommendation rule's largest acceptable mean difference
AGREE_WITHIN = 1  # checks: PC minima this close agree


def run_name(family: str, noise: str, seed: int, schedule: str = "cosine") -> str:
    return f"{family}-{noise}-s{seed}" if schedule == "cosine" else f"{family}-{noise}-{schedule}-s{seed}"


def run_data(noise: str, seed: int):
    """(train images, given labels, test images, test labels): a seeded 5000-image training subset,
    its labels with the regime's symmetric noise, and the first 5000 test images."""
    x_all, y_all = split_tensors(DATA, "train")
    x_test, y_test = split_tensors(DATA, "test")
    rng = np.random.default_rng(2000 + seed)
    idx = torch.from_numpy(rng.permutation(len(x_all))[:TRAIN])
    x, y = x_all[idx], y_all[idx]
    if NOISE[noise]:
        y = symmetric_noise(y, NOISE[noise], 10, rng)
    return x, y, x_test[:TEST], y_test[:TEST]


def train_run(family: str, noise: str, seed: int, schedule: str = "cosine") -> dict:
    """One training run watched by both Monitors; returns its per-check series."""
    x, y, x_test, y_test = run_data(noise, seed)
    torch.manual_seed(seed)
    model = FAMILIES[family]()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, nesterov=True)
    steps_per_epoch = math.ceil(len(x) / BATCH)
    decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, EPOCHS * steps_per_epoch) if schedule == "cosine" else None
    common = dict(train_data=TensorDataset(x, y), every=steps_per_epoch, total_steps=EPOCHS * steps_per_epoch)
    monitors = {mode: valfree.Monitor(model, **common) for mode in MODES}
    order = torch.Generator().manual_seed(seed)
    series = {"step": [], "test_acc": [], "grad_norm": [], **{m: {"pred_change": [], "label_agreement": [], "pred_subset": []} for m in MODES}}
    seconds = {"train": 0.0, **{m: 0.0 for m in MODES}}
    step = 0
    for _ in range(EPOCHS):
        perm = torch.randperm(len(x), generator=order)
        for start in range(0, len(x), BATCH):
            ids = perm[start : start + BATCH]
            xb, yb = x[ids], y[ids]
            t = time.process_time()
            logits = model(xb)
            F.cross_entropy(logits, yb).backward()
            opt.step()
            opt.zero_grad()
            if decay is not None:
                decay.step()
            step += 1
            seconds["train"] += time.process_time() - t
            for mode, monitor in monitors.items():
                t = time.process_time()
                if mode == "piggyback":
                    monitor.step(step, batch=(xb, yb), sample_ids=ids, output=logits.detach())
                else:
                    monitor.step(step, batch=(xb, yb))
                seconds[mode] += time.process_time() - t
        series["step"].append(step)
        series["test_acc"].append(evaluate(model, x_test, y_test)[0])
        probes = {m: monitors[m].last.grad_norm for m in MODES}
        if probes["fixed"] != probes["piggyback"]:
            raise AssertionError(f"the two Monitors probed different batches: {probes}")
        series["grad_norm"].append(probes["fixed"])
        for mode in MODES:
            for key in ("pred_change", "label_agreement", "pred_subset"):
                series[mode][key].append(float(monitors[mode].last_columns.get(key, math.nan)))
    choices = {}
    for mode in MODES:
        best = monitors[mode].finish()
        monitors[mode].close()
        choices[mode] = {"monitor_step": best.step, "monitor_wave_step": best.choice.wave_step}
    return {"series": series, "choices": choices, "cpu_seconds": seconds, "steps_per_epoch": steps_per_epoch}


def analyse(run: dict) -> dict:
    """Each mode's choices and gaps, from the recorded series (checked against the Monitor's own)."""
    s = run["series"]
    acc = np.asarray(s["test_acc"])
    best = int(acc.argmax())
    out = {"best_check": best + 1, "best_test_acc": float(acc[best])}
    for mode in MODES:
        cols = {"grad_norm": s["grad_norm"], **s[mode]}
        steps = [float(v) for v in s["step"]]
        mine = {}
        for rule in RULES:
            choice = select_by_rule(rule, steps, cols)
            mine[rule] = {"check": choice.index + 1, "gap": 100 * float(acc[best] - acc[choice.index])}
            if rule == DEFAULT_RULE:
                if choice.step != run["choices"][mode]["monitor_step"]:
                    raise AssertionError(f"{mode}: the rule on the recorded series chose {choice.step}, the Monitor "
                                         f"{run['choices'][mode]['monitor_step']}")
                mine["wave_check"] = steps.index(choice.wave_step) + 1
                mine["guard_fired"] = bool(choice.guard_fired)
        checks, chosen = replay(cols, DEFAULT_RULE, DEFAULT_WARMUP, DEFAULT_PATIENCE)
        mine["online"] = {"checks": checks, "check": chosen + 1, "gap": 100 * float(acc[best] - acc[chosen])}
        out[mode] = mine
    out["wave_distance"] = abs(out["fixed"]["wave_check"] - out["piggyback"]["wave_check"])
    sec = run["cpu_seconds"]
    out["cpu_percent"] = {m: 100 * sec[m] / sec["train"] for m in MODES}  # the Monitor's CPU time per training CPU time
    return out


def _mean_se(values) -> tuple[float, float]:
    v = np.asarray(values, dtype=float)
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan


def summarise(runs: dict) -> dict:
    """Per regime (family x labels): gaps per mode and rule, paired differences, PC-minimum agreement."""
    groups: dict = {}
    for name, run in runs.items():
        groups.setdefault(name.rsplit("-s", 1)[0], []).append(analyse(run))
    out = {}
    for regime, results in sorted(groups.items()):
        cell = {"runs": len(results), "best_test_acc": _mean_se([r["best_test_acc"] for r in results])[0]}
        for label, get in ((DEFAULT_RULE, lambda r, m: r[m][DEFAULT_RULE]["gap"]),
                           ("label-wave", lambda r, m: r[m]["label-wave"]["gap"]),
                           ("online", lambda r, m: r[m]["online"]["gap"])):
            cell[label] = {m: _mean_se([get(r, m) for r in results]) for m in MODES}
            cell[label]["difference"] = _mean_se([get(r, "piggyback") - get(r, "fixed") for r in results])
        cell["online_checks"] = {m: _mean_se([r[m]["online"]["checks"] for r in results])[0] for m in MODES}
        cell["wave_check"] = {m: [r[m]["wave_check"] for r in results] for m in MODES}
        cell["wave_agree"] = sum(r["wave_distance"] <= AGREE_WITHIN for r in results)
        cell["wave_distance"] = _mean_se([r["wave_distance"] for r in results])[0]
        cell["guard_fired"] = {m: sum(r[m]["guard_fired"] for r in results) for m in MODES}
        cell["cpu_percent"] = {m: _mean_se([r["cpu_percent"][m] for r in results])[0] for m in MODES}
        out[regime] = cell
    return out


def recommend(summary: dict) -> dict:
    """The recommendation rule of the module docstring."""
    worse = {regime: {k: c[k]["difference"][0] for k in (DEFAULT_RULE, "online") if c[k]["difference"][0] > THRESHOLD}
             for regime, c in summary.items()}
    worse = {k: v for k, v in worse.items() if v}
    wave_worse = {regime: c["label-wave"]["difference"][0] for regime, c in summary.items()
                  if c["label-wave"]["difference"][0] > THRESHOLD}
    return {"piggyback_ok": not worse, "worse_regimes": worse, "label_wave_worse_regimes": wave_worse}


def _pm(mean_se) -> str:
    m, se = mean_se
    return f"{m:+.2f}" if not math.isfinite(se) else f"{m:+.2f} ± {se:.2f}"


def _pair(cell: dict) -> str:
    return f"{cell['fixed'][0]:.2f} / {cell['piggyback'][0]:.2f} ({_pm(cell['difference'])})"


def table(summary: dict) -> str:
    lines = [
        "| regime | runs | best test acc | default rule, whole run: gap fixed / piggyback (difference) "
        "| online stop: gap fixed / piggyback (difference) | checks taken | label-wave: gap fixed / piggyback (difference) "
        "| PC minima within 1 check (checks: fixed; piggyback) | guard fired | Monitor CPU / training CPU |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for regime, c in summary.items():
        wave = f"{c['wave_agree']}/{c['runs']} ({', '.join(map(str, c['wave_check']['fixed']))}; " \
               f"{', '.join(map(str, c['wave_check']['piggyback']))})"
        lines.append("| " + " | ".join([
            regime, str(c["runs"]), f"{100 * c['best_test_acc']:.1f} %", _pair(c[DEFAULT_RULE]), _pair(c["online"]),
            f"{c['online_checks']['fixed']:.1f} / {c['online_checks']['piggyback']:.1f}", _pair(c["label-wave"]), wave,
            f"{c['guard_fired']['fixed']} / {c['guard_fired']['piggyback']}",
            f"{c['cpu_percent']['fixed']:.1f} % / {c['cpu_percent']['piggyback']:.1f} %",
        ]) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=sorted(FAMILIES))
    parser.add_argument("--noise", nargs="+", choices=sorted(NOISE), default=sorted(NOISE))
    parser.add_argument("--seeds", nargs="+", type=int, help="default: 5 for the MLP, 3 for the CNN")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine", help="constant: runs named -constant-")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = json.loads(args.out.read_text()) if args.out.exists() else {"runs": {}}
    for family in args.families:
        for noise in args.noise:
            for seed in args.seeds or SEEDS[family]:
                name = run_name(family, noise, seed, args.schedule)
                if name in result["runs"]:
                    continue
                t = time.time()
                result["runs"][name] = train_run(family, noise, seed, args.schedule)
                print(f"{name}: {time.time() - t:.0f} s", flush=True)
                _write(args.out, result)  # after every run, so an interrupted call keeps what it trained
    result["summary"] = summarise(result["runs"])
    result["recommendation"] = recommend(result["summary"])
    result.update(
        command="nice -n 10 python benchmarks/piggyback.py",
        generated=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        settings={"data": DATA, "train_images": TRAIN, "test_images": TEST, "epochs": EPOCHS, "batch": BATCH, "lr": LR,
                  "schedule": "cosine to zero, stepped per batch (runs named -constant-: constant rate)",
                  "seeds": SEEDS,
                  "families": {"mlp": "valfree.models.mlp()", "cnn": "valfree.models.cnn(width=16)"},
                  "noise": NOISE, "threads": args.threads, "checks": "one per epoch", "patience": DEFAULT_PATIENCE,
                  "warmup": DEFAULT_WARMUP, "threshold_points": THRESHOLD, "agree_within_checks": AGREE_WITHIN,
                  "torch": torch.__version__, "cpu_count": os.cpu_count()},
    )
    _write(args.out, result)
    print(table(result["summary"]))
    print(f"\nrecommendation: {result['recommendation']}")
    return result


def _write(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
