"""TPV against test loss over a regularisation sweep (the TPV paper's U-shape claim).

MLPs on Fashion-MNIST trained to the end of a cosine schedule at several weight-decay strengths and
label-smoothing amounts. For each final model: Tr(H_eff) (isotropic TPV, sigma = 1) of the logits on
training inputs and on test inputs, and the test loss and accuracy. The paper's claim: TPV and test
loss fall together where the loss is low, and part ways in the underfit region (small TPV, large loss).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import torch

import valfree

from .config import CACHE, FAMILIES, REGIMES, RESULTS, RunSpec
from .data import run_data
from .results import machine
from .trajectories import evaluate, make_optimizer, training_steps, write_json_atomic

WEIGHT_DECAYS = (0.0, 1e-4, 5e-4, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)
SMOOTHINGS = (0.0, 0.05, 0.1, 0.2, 0.4, 0.6, 0.8)
TPV_INPUTS, TPV_PROBES = 512, 8


def train_final(spec: RunSpec, label_smoothing: float) -> tuple[torch.nn.Module, object]:
    data = run_data(spec)
    torch.manual_seed(spec.seed)
    model = spec.family.build(data.in_size)
    total = spec.regime.epochs * (len(data.x_train) // spec.batch_size)
    opt, sched = make_optimizer(spec, model, total)
    for _ in training_steps(spec, model, data, opt, sched, label_smoothing):
        pass
    return model, data


def measure(model, data, spec: RunSpec) -> dict:
    iso = valfree.noise.Isotropic(1.0)
    train = valfree.tpv(model, data.x_train[:TPV_INPUTS], iso, probes=TPV_PROBES, seed=0)
    test = valfree.tpv(model, data.x_test[:TPV_INPUTS], iso, probes=TPV_PROBES, seed=0)
    test_acc, test_loss = evaluate(model, data.x_test, data.y_test)
    train_acc, train_loss = evaluate(model, data.x_train_eval, data.y_train_eval)
    return {
        "train_tpv": train.value, "train_tpv_stderr": train.input_stderr,
        "test_tpv": test.value, "test_tpv_stderr": test.input_stderr,
        "test_acc": test_acc, "test_loss": test_loss, "train_loss": train_loss, "train_acc": train_acc,
    }


def sweep_specs(quick: bool) -> list[tuple[str, float, RunSpec, float]]:
    """(knob, value, spec, label_smoothing) for every point of the sweep."""
    base = replace(REGIMES["clean"], name="sweep", train_size=5000 if quick else 10000, epochs=3 if quick else 6)
    seeds = (0,) if quick else (0, 1, 2)
    wds = WEIGHT_DECAYS[::2] + (WEIGHT_DECAYS[-1],) if quick else WEIGHT_DECAYS
    lss = SMOOTHINGS[::2] if quick else SMOOTHINGS
    test_size = 2000 if quick else 5000
    out = []
    for seed in seeds:
        for wd in wds:
            out.append(("weight_decay", wd, RunSpec(FAMILIES["mlp"], replace(base, weight_decay=wd), seed, test_size=test_size), 0.0))
        for ls in lss:
            out.append(("label_smoothing", ls, RunSpec(FAMILIES["mlp"], base, seed, test_size=test_size), ls))
    return out


def run_sweep(quick: bool = False, log=print) -> dict:
    path = RESULTS / ("evidence_sweep_quick.json" if quick else "evidence_sweep.json")
    cache = CACHE / path.name
    done = json.loads(cache.read_text()) if cache.exists() else {}
    torch.set_num_threads(1)
    points = []
    for knob, value, spec, ls in sweep_specs(quick):
        key = f"{knob}={value}|seed={spec.seed}|{spec.key()}"
        if key not in done:
            t0 = time.perf_counter()
            model, data = train_final(spec, ls)
            done[key] = {**measure(model, data, spec), "seconds": time.perf_counter() - t0}
            cache.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(cache, done)
            log(f"sweep {knob}={value} seed {spec.seed}: {done[key]}")
        points.append({"knob": knob, "value": value, "seed": spec.seed, **done[key]})
    for p in points:
        if not all(math.isfinite(p[k]) for k in ("train_tpv", "test_tpv", "test_loss")):
            raise AssertionError(f"sweep point {p['knob']}={p['value']} has a non-finite TPV or loss")
    result = {
        "command": "python -m benchmarks.evidence sweep" + (" --grid quick" if quick else ""),
        "machine": machine(), "model": "mlp 784-256-256-10", "tpv": f"Tr(H_eff) of the logits, isotropic sigma=1, {TPV_INPUTS} inputs x {TPV_PROBES} probes",
        "training": {"images": sweep_specs(quick)[0][2].regime.train_size, "epochs": sweep_specs(quick)[0][2].regime.epochs, "schedule": "SGD momentum 0.9, lr 0.05, cosine"},
        "points": points,
    }
    write_json_atomic(path, result)
    return result
