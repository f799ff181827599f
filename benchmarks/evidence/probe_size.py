"""Does a smaller probe batch keep the signal? (the paper's open question on batch size)

The Monitor's fixed-batch mode pays one eval forward pass over the probe batch per probe
(docs/integrations.md), so its overhead grows with the batch: on the demo CNN a 32-image probe every
100 steps costs under 0.1 % of an epoch and the 256-image batch of this grid about 0.9 %. This study
re-scores every cached checkpoint with the probe on seeded subsets of each run's fixed probe batch
(16, 32, 64 and 128 images, :data:`DRAWS` different subsets each, every subset fixed across the run's
checkpoints) next to the whole batch, and reports per regime the mean Pearson r with test accuracy
and the universal preset's gap to the oracle.

It is a signal group of the evidence grid (``signals.GROUPS["probe_size"]``), so ``make bench-evidence``
computes it for cached runs without retraining and the report renders it from the results JSON.
"""

from __future__ import annotations

import numpy as np
import torch

import valfree
from valfree.selection import correlations

from .selectors import UNIVERSAL, gap, pick

SUBSET_SIZES = (16, 32, 64, 128)
DRAWS = 3


def subset_key(size: int, draw: int) -> str:
    return f"hg_grad_norm_n{size}_d{draw}"


def subset_indices(n: int, size: int, draw: int) -> torch.Tensor:
    """The ``draw``-th seeded subset of ``size`` of the ``n`` probe images (the same for every checkpoint)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(1000 + draw))[:size]


def probe_size_signals(model, x_probe: torch.Tensor, y_probe: torch.Tensor) -> dict:
    """The head-gradient norm on every subset smaller than the probe batch (the whole batch is the
    ``probe`` group's ``hg_grad_norm``)."""
    out = {}
    for size in SUBSET_SIZES:
        if size >= len(x_probe):
            continue
        for draw in range(DRAWS):
            idx = subset_indices(len(x_probe), size, draw)
            out[subset_key(size, draw)] = float(valfree.head_gradient(model, x_probe[idx], y_probe[idx]).grad_norm)
    return out


def probe_size_summary(runs, full_size: int) -> dict:
    """Per regime (and over all runs) and per probe-batch size: mean ± std over runs of the Pearson r
    with test accuracy and of the universal preset's gap to the oracle (test-accuracy points). For a
    subset size each run contributes the mean over its draws."""
    def per_run(run, size) -> tuple[float, float] | None:
        keys = ["hg_grad_norm"] if size == full_size else [subset_key(size, d) for d in range(DRAWS)]
        if not all(np.isfinite(run.series(k)).all() for k in keys):
            return None
        r = [correlations(run.series(k), run.test_acc()).pearson for k in keys]
        g = [gap(run, pick(run, k, "min", UNIVERSAL)) for k in keys]
        return float(np.mean(r)), float(np.mean(g))

    sizes = [s for s in SUBSET_SIZES if s < full_size] + [full_size]
    regimes = sorted({run.regime for run in runs}) + ["all"]
    cells = {}
    for regime in regimes:
        members = [run for run in runs if regime in ("all", run.regime)]
        for size in sizes:
            values = [v for v in (per_run(run, size) for run in members) if v is not None]
            if not values:
                continue
            r, g = np.array(values).T
            ddof = 1 if len(values) > 1 else 0  # sample std, as the other tables of the report
            cells[f"{regime}|{size}"] = {"n": len(values), "pearson_mean": float(r.mean()), "pearson_std": float(r.std(ddof=ddof)),
                                         "gap_mean": float(g.mean()), "gap_std": float(g.std(ddof=ddof))}
    return {"sizes": sizes, "regimes": regimes, "draws": DRAWS, "cells": cells}


def section_probe_size(r: dict) -> str:
    """The report's section, from the results JSON alone."""
    s = r.get("probe_size")
    if not s or not s["cells"]:
        return ""
    rows = []
    for size in s["sizes"]:
        row = [f"{size}" + (" (whole batch)" if size == s["sizes"][-1] else "")]
        for regime in s["regimes"]:
            c = s["cells"].get(f"{regime}|{size}")
            row.append("n/a" if c is None else f"{c['pearson_mean']:+.2f} / {c['gap_mean']:.2f} ± {c['gap_std']:.2f}")
        rows.append(row)
    header = "| probe images | " + " | ".join(s["regimes"]) + " |"
    lines = [header, "|" + "---|" * (len(s["regimes"]) + 1)] + ["| " + " | ".join(row) + " |" for row in rows]
    n = s["cells"].get(f"all|{s['sizes'][-1]}", {}).get("n", 0)
    return "\n\n".join([
        f"The probe on seeded subsets of each run's fixed {s['sizes'][-1]}-image probe batch ({s['draws']} subsets "
        f"per size, each fixed across the run's checkpoints; {n} runs). Each cell: mean Pearson r of the probe "
        "with test accuracy / the universal preset's gap to the oracle in test-accuracy points (mean ± std over "
        "runs; a run's value is the mean over its subsets). The cost of a fixed-batch probe grows with its size "
        "(docs/integrations.md), which is why this matters.",
        "\n".join(lines),
        _reading(s),
    ])


def _reading(s: dict) -> str:
    """Computed from the cells: how far r and the gap move from the smallest batch to the whole one."""
    small, whole = s["sizes"][0], s["sizes"][-1]
    parts, dr, dg = [], [], []
    for regime in s["regimes"]:
        a, b = s["cells"].get(f"{regime}|{small}"), s["cells"].get(f"{regime}|{whole}")
        if regime == "all" or not (a and b):
            continue
        parts.append(f"{regime}: r {a['pearson_mean']:+.2f} at {small} images and {b['pearson_mean']:+.2f} at "
                     f"{whole}, gap {a['gap_mean']:.2f} and {b['gap_mean']:.2f} points")
        dr.append(abs(a["pearson_mean"] - b["pearson_mean"]))
        dg.append(a["gap_mean"] - b["gap_mean"])
    if not parts:
        return ""
    return (f"**Reading.** {'; '.join(parts)}. From {small} to {whole} images the mean correlation moved by at most "
            f"{max(dr):.2f} in any regime, and the gap changed by {min(dg):+.2f} to {max(dg):+.2f} points: a smaller "
            "batch makes every checkpoint's score noisier, and the differences that decide the tail-window choice "
            "are small.")
