"""Train against test TPV on a synthetic teacher-student task (the TPV paper's stability claim).

A fixed random two-layer teacher labels Gaussian inputs (10 classes, argmax of its logits); students
are one-hidden-layer MLPs of several widths trained on 2 000 teacher-labelled inputs. For each student,
Tr(H_eff) of the logits (isotropic TPV, sigma = 1) on 512 of its training inputs and on 512 fresh
inputs from the same distribution. Seconds of CPU per width.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import nn

import valfree

from .config import RESULTS
from .results import machine
from .trajectories import write_json_atomic

DIM, CLASSES, N_TRAIN, N_EVAL = 20, 10, 2000, 512
WIDTHS = (8, 32, 128, 512)


def teacher(seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(10_000 + seed)
    net = nn.Sequential(nn.Linear(DIM, 64), nn.Tanh(), nn.Linear(64, CLASSES))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / (p.shape[-1] ** 0.5 if p.dim() > 1 else 1.0))
    return net


def student(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(DIM, width), nn.ReLU(), nn.Linear(width, CLASSES))


def run_teacher_student(quick: bool = False, log=print) -> dict:
    torch.set_num_threads(1)
    seeds = (0,) if quick else (0, 1)
    widths = WIDTHS[:2] if quick else WIDTHS
    epochs = 10 if quick else 30
    rows = []
    for seed in seeds:
        torch.manual_seed(seed)
        t_net = teacher(seed)
        g = torch.Generator().manual_seed(seed)
        x_train = torch.randn(N_TRAIN, DIM, generator=g)
        x_fresh = torch.randn(N_EVAL, DIM, generator=g)
        with torch.no_grad():
            y_train = t_net(x_train).argmax(1)
            y_fresh = t_net(x_fresh).argmax(1)
        for width in widths:
            t0 = time.perf_counter()
            torch.manual_seed(seed)
            net = student(width)
            opt = torch.optim.Adam(net.parameters(), lr=3e-3)
            for _ in range(epochs):
                perm = torch.randperm(N_TRAIN, generator=g)
                for i in range(0, N_TRAIN, 100):
                    idx = perm[i : i + 100]
                    opt.zero_grad(set_to_none=True)
                    F.cross_entropy(net(x_train[idx]), y_train[idx]).backward()
                    opt.step()
            iso = valfree.noise.Isotropic(1.0)
            tr = valfree.tpv(net, x_train[:N_EVAL], iso, probes=8, seed=0)
            te = valfree.tpv(net, x_fresh, iso, probes=8, seed=0)
            with torch.no_grad():
                acc = float((net(x_fresh).argmax(1) == y_fresh).float().mean())
            rows.append({"seed": seed, "width": width, "train_tpv": tr.value, "train_stderr": tr.input_stderr,
                         "test_tpv": te.value, "test_stderr": te.input_stderr, "ratio": te.value / tr.value,
                         "fresh_acc": acc, "seconds": time.perf_counter() - t0, "task": "teacher-student"})
            log(f"teacher-student seed {seed} width {width}: train {tr.value:.4g} test {te.value:.4g}")
    for r in rows:
        if not (r["train_tpv"] > 0 and r["test_tpv"] > 0):
            raise AssertionError(f"teacher-student width {r['width']}: non-positive TPV")
    result = {"command": "python -m benchmarks.evidence sweep" + (" --grid quick" if quick else ""), "machine": machine(),
              "setup": f"teacher 20-64-10 tanh, students 20-w-10 ReLU, {N_TRAIN} training inputs, Adam 3e-3, {epochs} epochs; "
                       f"Tr(H_eff) on {N_EVAL} training vs {N_EVAL} fresh inputs, 8 probes",
              "rows": rows}
    name = "evidence_teacher_student_quick.json" if quick else "evidence_teacher_student.json"
    write_json_atomic(RESULTS / name, result)
    return result

