"""Render docs/benchmarks.md (or docs/benchmarks_quick.md) from the JSON results alone.

``build_report(grid)`` first rebuilds ``benchmarks/results/evidence_{grid}.json`` from the cache when
the cache holds runs (so the assertions in metrics/checks run again), then renders markdown and plots
from the JSON files in benchmarks/results/. With no cache (a fresh clone) it renders the committed JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from . import plots
from .config import DOCS, RESULTS, all_grid, cache_for, full_grid, quick_grid
from .external import cost_section, stability_points
from .probe_size import section_probe_size
from .report_memorisation import section_memorisation
from .results import build_results, collect, write_results

MAIN_SELECTORS = ["hg_raw", "hg_score_w", "hg_score_z", "hg_raw_family", "hg_score_w_family", "hg_score_z_family",
                  "entropy", "confidence", "margin", "pseudo_heldout", "tpv", "tpv_whole_run", "hg_tpv_guard",
                  "tpv_post_peak", "hg_tpv_post_peak_guard", "hg_tpv_rank", "ww_alpha", "ww_alpha_whole_run", "last", "min_train_loss", "val100", "val500", "val1000"]
# The commands that produced the committed numbers: the base and extended grids trained together (cheap
# families first), then the report; `make bench-evidence` (= `run --workers 2`) does the same and also
# reruns the sweep and perf benchmarks, whose committed JSON the report otherwise reuses.
_TRAIN_ALL = "python -m benchmarks.evidence train --grid all --workers 2 --cheap-first && python -m benchmarks.evidence report"
COMMANDS = {"full": _TRAIN_ALL + "  # or make bench-evidence",
            "all": _TRAIN_ALL + "  # or make bench-evidence",
            "quick": "make bench-quick  # = python -m benchmarks.evidence quick"}


def f(x, nd=2, pct=False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{100 * x:.0f} %" if pct else f"{x:.{nd}f}"


def pm(cell: dict | None, nd=2) -> str:
    if not cell:
        return "n/a"
    if cell.get("n", 2) < 2:  # no spread from a single run
        return f"{cell['gap_mean']:.{nd}f} (1 run)"
    return f"{cell['gap_mean']:.{nd}f} ± {cell['gap_std']:.{nd}f}"


def partial_note(r: dict) -> str:
    """A warning first thing in the report when the grid is incomplete, with what finished per family."""
    if not r["runs_missing"]:
        return ""
    done = {}
    for name in r["per_run"]:
        fam = name.split("-")[0]
        done[fam] = done.get(fam, 0) + 1
    per_fam = ", ".join(f"{fam} {done.get(fam, 0)} of {len(r['sizes']['regimes']) * len(r['sizes']['seeds'])}" for fam in r["sizes"]["families"])
    return (f"> **Partial grid: {r['runs_finished']} of {r['runs_expected']} runs finished** ({per_fam}). Cells marked "
            "'(1 run)' have no spread, and families with fewer seeds weigh less in the pooled rows. The missing runs are listed "
            "under Setup; `make bench-evidence` resumes from the cache and regenerates this page.")


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def section_setup(r: dict) -> str:
    s = r["sizes"]
    fams = ", ".join(f"{k} ({v['factory']} {', '.join(f'{a}={b}' for a, b in v.items() if a not in ('factory', 'optimizer', 'lr'))}; "
                     f"{v['optimizer']}, lr {v['lr']})" for k, v in s["families"].items())
    regs = "; ".join(f"**{k}**: {v['description'] or ''} ({v['train_size']} images, {v['epochs']} epochs, label noise {v['label_noise']}, "
                     f"weight decay {v['weight_decay']}, {v['schedule']} schedule)" for k, v in s["regimes"].items())
    params = {m["name"].split("-")[0]: m["params"] for m in r["run_meta"]}
    train_min = sum(m["train_seconds"] + m["eval_seconds"] for m in r["run_meta"]) / 60
    cpu = [m.get("cpu_seconds") for m in r["run_meta"] if m.get("cpu_seconds") == m.get("cpu_seconds") and m.get("cpu_seconds") is not None]
    missing = f" Missing: {', '.join(r['runs_missing'])}." if r["runs_missing"] else ""
    return "\n".join([
        f"- Command: `{r['command']}`; generated {r['generated']}.",
        f"- Machine: {r['machine']['cpu']}, {r['machine']['cores']} cores (also running other jobs), torch {r['machine']['torch']}, one torch thread per worker.",
        f"- Families: {fams}. Parameters: {', '.join(f'{k} {v:,}' for k, v in params.items())}.",
        f"- Regimes: {regs}.",
        f"- Seeds {s['seeds']}; {s['checkpoints']} checkpoints per run, evenly spaced; batch {s['batch_size']}.",
        f"- Test metric: top-1 on {' / '.join(str(n) for n in s['test_images'])} Fashion-MNIST test images (evaluation only)"
        + (f"; training recorded the first {' / '.join(str(n) for n in s['test_images_recorded'])}, and "
           "`benchmarks/evidence/full_test.py` adds the rest of the split from the cached checkpoints, so that the oracle "
           "is not picked on a small sample's noise." if s.get("test_images_recorded", s["test_images"]) != s["test_images"] else "."),
        f"- Probe batch: {s['probe_size']} fixed training images (with the labels trained on, so noisy in the noisy regime); "
        f"pseudo-label probe: {s['probe_size']} held-out unlabeled images; validation sets: the first {s['val_sizes']} images of a "
        "10 000-image held-out slice of the training split, never trained on, with clean labels.",
        f"- Runs finished: {r['runs_finished']} of {r['runs_expected']}.{missing} Training plus per-checkpoint evaluation: "
        f"{train_min:.0f} wall-clock minutes summed over runs (niced, on a machine that also ran other "
        "jobs, so these are upper bounds)" + (f"; {sum(cpu) / 60:.0f} CPU-minutes over the {len(cpu)} runs that recorded CPU time" if cpu else "")
        + ". Signals are extra, see Cost.",
    ])


def section_correlation(r: dict) -> str:
    corr = r["correlations"]
    regs = list(r["sizes"]["regimes"]) + ["all"]
    rows = []
    for sig in ("hg_grad_norm", "hg_score_w", "hg_score_z", "pseudo_grad_norm", "tpv_trace", "ww_alpha", "hg_entropy", "train_loss"):
        row = [sig]
        for reg in regs:
            c = corr.get(f"{sig}|all|{reg}")
            row.append(f"{c['pearson_mean']:+.2f} / {c['spearman_mean']:+.2f} / {c['kendall_mean']:+.2f}" if c else "n/a")
        rows.append(row)
    fam_rows = []
    for fam in r["sizes"]["families"]:
        row = [fam]
        for reg in r["sizes"]["regimes"]:
            c = corr.get(f"hg_grad_norm|{fam}|{reg}")
            row.append(("n/a" if not c else f"{c['pearson_mean']:+.2f} (1 run)" if c["n"] < 2 else f"{c['pearson_mean']:+.2f} ± {c['pearson_std']:.2f}"))
        fam_rows.append(row)
    overall = corr.get("hg_grad_norm|all|all")
    return "\n\n".join([
        "Correlation of each signal with test accuracy across the checkpoints of one run, averaged over runs "
        "(Pearson / Spearman / Kendall). The paper reports Pearson r = -0.845 on ImageNet; a negative value means "
        "a smaller signal goes with higher accuracy.",
        table(["signal"] + regs, rows),
        "Head-gradient norm, Pearson r per family (mean ± std over seeds):",
        table(["family"] + list(r["sizes"]["regimes"]), fam_rows),
        f"**Answer.** Over all {overall['n']} runs the raw probe's mean Pearson r is {overall['pearson_mean']:+.2f} "
        f"(± {overall['pearson_std']:.2f}). A within-run correlation this strong mostly reflects that both the probe and "
        "accuracy move with training progress; whether the *tail* choice is good is what the gap tables below test.",
    ])


def section_gaps(r: dict) -> str:
    cells = r["summary"]["cells"]
    fams, regs = list(r["sizes"]["families"]), list(r["sizes"]["regimes"])
    out = ["Gap to the oracle in test-accuracy points (mean ± std over seeds) for the paper's universal preset "
           "(tail 20 %, EMA 3) and the per-family preset chosen leave-one-seed-out (on the same family's other seeds, "
           "all regimes; never on the evaluated run; with no other seed of the family finished it falls back to the universal "
           "preset). Candidate presets: tail 10/20/30/50/100 % x EMA 1/3/5/9. Paper (ImageNet): 4.24 ± 2.00 universal, "
           "about 1.12 per family."]
    for sel in ("hg_raw", "hg_score_w", "hg_score_z", "hg_raw_family", "last", "val500"):
        rows = [[fam] + [pm(cells.get(f"{sel}|{fam}|{reg}")) for reg in regs] for fam in fams]
        rows.append(["**all**"] + [pm(cells.get(f"{sel}|all|{reg}")) for reg in regs])
        out += [f"**{sel}**", table(["family"] + regs, rows)]
    return "\n\n".join(out)


def section_ranking(r: dict) -> str:
    labels = {s["name"]: (s["label"], s["kind"]) for s in r["selectors"]}
    rows = [[str(i + 1), o["selector"], labels[o["selector"]][1], f(o["gap_mean"]), f(o["gap_std"]), f(o["gap_median"]),
             f(o["beats_last"], pct=True), f(o["beats_val500"], pct=True), f(o["mean_rank"], 1), str(o["n"])]
            for i, o in enumerate(r["summary"]["overall"])]
    return "\n\n".join([
        "All runs pooled, sorted by mean gap. *beats last*: share of runs where the selector's checkpoint is strictly "
        "better on test than the last one (ties are not wins); *beats val500*: strictly better than the 500-image "
        "validation set's choice; *rank*: mean rank among the selectors per run (1 = smallest gap).",
        table(["#", "selector", "kind", "gap mean", "gap std", "gap median", "beats last", "beats val500", "rank", "runs"], rows),
    ])


def section_by_regime(r: dict) -> str:
    cells = r["summary"]["cells"]
    regs = list(r["sizes"]["regimes"])
    rows = []
    for sel in MAIN_SELECTORS:
        row = [sel]
        for reg in regs:
            c = cells.get(f"{sel}|all|{reg}")
            row.append(f"{pm(c)} ({f(c['beats_last'], pct=True)} / {f(c['beats_val500'], pct=True)})" if c else "n/a")
        rows.append(row)
    return "\n\n".join([
        "Per regime, all families and seeds pooled: gap mean ± std (share of runs beating the last checkpoint / the 500-image validation set).",
        table(["selector"] + regs, rows),
        "![gaps by selector and regime](img/evidence_gaps.png)",
    ])


def section_failures(r: dict) -> str:
    cells = r["summary"]["cells"]
    lines = []
    for reg in r["sizes"]["regimes"]:
        runs = [v for v in r["per_run"].values() if v["regime"] == reg]
        if not runs:
            continue
        picks_last = sum(v["chosen"]["hg_raw"]["index"] == v["chosen"]["last"]["index"] for v in runs)
        drop = np.mean([v["chosen"]["oracle"]["test_acc"] - v["chosen"]["last"]["test_acc"] for v in runs]) * 100
        names = [n for n, v in r["per_run"].items() if v["regime"] == reg]
        final_train = np.mean([r["curves"][n]["train_acc"][-1] for n in names if "train_acc" in r["curves"][n]] or [np.nan])
        noise = r["sizes"]["regimes"][reg]["label_noise"]
        memo = (f" Final training accuracy on its own labels {100 * final_train:.1f} %" +
                (f" (a model that fits only the clean {100 * (1 - noise):.0f} % and none of the flipped labels scores at most "
                 f"{100 * (1 - noise):.0f} %; above that it has memorised wrong labels)." if noise else "."))
        hg, last, val = cells.get(f"hg_raw|all|{reg}"), cells.get(f"last|all|{reg}"), cells.get(f"val500|all|{reg}")
        verdict = "no better than" if hg["gap_mean"] >= last["gap_mean"] - 1e-9 else "better than"
        lines.append(
            f"- **{reg}**: the universal probe picked the last checkpoint in {picks_last} of {len(runs)} runs; test accuracy at the "
            f"end was {drop:.2f} points below its peak on average. Probe gap {pm(hg)} vs last {pm(last)} "
            f"({verdict} the last checkpoint) vs 500-image validation {pm(val)}.{memo}")
    remedies = []
    for sel in ("hg_raw", "pseudo_heldout", "tpv_whole_run", "hg_tpv_guard", "hg_tpv_rank", "tpv_post_peak", "hg_tpv_post_peak_guard", "val500"):
        remedies.append([sel] + [pm(cells.get(f"{sel}|all|{reg}")) for reg in r["sizes"]["regimes"]])
    return "\n\n".join([
        "Where the probe fails, stated per regime from the numbers above:",
        "\n".join(lines),
        "Remedies measured on the same runs. The first four rules were fixed before any run finished, and none was tuned on "
        "test accuracy: the probe on "
        "held-out *unlabeled* images with pseudo-labels; the whole-run minimum of Tr(H_eff); the probe with a Tr(H_eff) "
        "guard (if smoothed Tr(H_eff) rises across the tail window and its minimum lies before it, take that minimum); "
        "and the whole-run argmin of the mean rank of probe and Tr(H_eff). Two more were added *post hoc*, after the first "
        "two finished runs showed the whole-run Tr(H_eff) minimum landing in the underfit phase at the start of training: "
        "the Tr(H_eff) minimum after its peak (the TPV paper reads the peak as the end of the underfit phase), and the probe "
        "guarded by it. Treat those two as exploratory.",
        table(["selector"] + list(r["sizes"]["regimes"]), remedies),
        "![trajectories](img/evidence_trajectories.png)",
    ])


def section_tpv(r: dict, sweep: dict | None, img: Path) -> str:
    out = []
    stab, stab_note = stability_points(RESULTS)
    pts = []
    if sweep:
        pts += [(p["train_tpv"], p["test_tpv"], f"sweep: {p['knob']}") for p in sweep["points"]]
    pts += stab
    ts = load(RESULTS / ("evidence_teacher_student.json" if r["grid"] == "full" else "evidence_teacher_student_quick.json"))
    if ts:
        pts += [(row["train_tpv"], row["test_tpv"], "teacher-student") for row in ts["rows"]]
        stab_note += f" Teacher-student: {ts['setup']} (`benchmarks/results/evidence_teacher_student*.json`)."
    if pts:
        plots.train_vs_test(pts, img / "evidence_tpv_train_vs_test.png", "train vs test TPV")
        ratios = np.array([b / a for a, b, _ in pts if a > 0])
        out.append(f"Train against test TPV, {len(pts)} models: median test/train ratio {np.median(ratios):.3f}, "
                   f"range {ratios.min():.3f} to {ratios.max():.3f}. {stab_note}")
        out.append("![train vs test TPV](img/evidence_tpv_train_vs_test.png)")
    if sweep:
        plots.tpv_sweep(sweep, img / "evidence_tpv_sweep.png")
        rows = []
        for knob in ("weight_decay", "label_smoothing"):
            for v in sorted({p["value"] for p in sweep["points"] if p["knob"] == knob}):
                ps = [p for p in sweep["points"] if p["knob"] == knob and p["value"] == v]
                rows.append([knob, f"{v:g}", f(np.mean([p["train_tpv"] for p in ps]), 1), f(np.mean([p["test_tpv"] for p in ps]), 1),
                             f(np.mean([p["test_loss"] for p in ps]), 3), f(np.mean([p["test_acc"] for p in ps]), 3), str(len(ps))])
        shape = []
        for knob in ("weight_decay", "label_smoothing"):
            vals = sorted({p["value"] for p in sweep["points"] if p["knob"] == knob})
            tpv = [np.mean([p["train_tpv"] for p in sweep["points"] if p["knob"] == knob and p["value"] == v]) for v in vals]
            per = [[p["test_loss"] for p in sweep["points"] if p["knob"] == knob and p["value"] == v] for v in vals]
            loss = [np.mean(x) for x in per]
            se = [np.std(x, ddof=1) / np.sqrt(len(x)) if len(x) > 1 else 0.0 for x in per]
            order = np.argsort(tpv)
            i_min = int(np.argmin(np.asarray(loss)[order]))
            top = int(order[-1])
            # A U needs the high-TPV end to be worse than the minimum by more than two standard errors over seeds.
            rise = loss[top] - loss[int(order[i_min])]
            interior = 0 < i_min < len(vals) - 1 and rise > 2 * max(se[top], se[int(order[i_min])], 1e-12)
            from scipy.stats import spearmanr

            rho = spearmanr(tpv, loss).statistic
            shape.append(f"{knob.replace('_', ' ')}: Spearman(train TPV, test loss) {rho:+.2f}; the lowest test loss is at "
                         + (f"an interior TPV (both branches of a U; high-TPV end {rise:+.4f} above the minimum, "
                            f"{100 * rise / loss[int(order[i_min])]:.1f} % of the loss: more than two standard errors over "
                            f"seeds{', but small' if rise < 0.01 * loss[int(order[i_min])] else ''})" if interior else
                            ("the largest TPV, or within two standard errors of it, so only the underfit branch "
                             f"(small TPV, large loss) is visible (high-TPV end {rise:+.3f} above the minimum)"
                             if i_min > 0 else "the smallest TPV")))
        training = ", ".join(f"{k} {v}" for k, v in sweep["training"].items())
        out += [f"Regularisation sweep ({sweep['model']}; {training}; {sweep['tpv']}; command `{sweep['command']}`). "
                + "; ".join(shape) + ".",
                table(["knob", "value", "train TPV", "test TPV", "test loss", "test acc", "seeds"], rows),
                "![TPV vs test loss](img/evidence_tpv_sweep.png)"]
    traj = r.get("tpv_trajectory", [])
    if traj:
        rows = [[t["run"], f"{t['best_epoch']:.1f}", f(100 * t["best_acc"]), f(t["peak_drop"]), f"{t['argmax_tpv_epoch']:.1f}",
                 f(100 * t["argmax_tpv_acc"]), f"{t['argmin_tpv_epoch']:.1f}", f(100 * t["argmin_tpv_acc"])]
                for t in traj if t["regime"] == "noisy"]
        noisy = [t for t in traj if t["regime"] == "noisy"]
        summary = ""
        if noisy:
            late = np.mean([t["argmax_tpv_epoch"] - t["best_epoch"] for t in noisy])
            cost_max = np.mean([100 * (t["best_acc"] - t["argmax_tpv_acc"]) for t in noisy])
            cost_min = np.mean([100 * (t["best_acc"] - t["argmin_tpv_acc"]) for t in noisy])
            summary = (f" Over these {len(noisy)} runs the argmax-TPV point came {late:+.1f} epochs after the test-accuracy "
                       f"peak on average, {cost_max:.2f} points of accuracy below it; the argmin-TPV point was "
                       f"{cost_min:.2f} points below it.")
        out += ["On the noisy-label trajectories: where smoothed Tr(H_eff) peaks and bottoms out, next to the test-accuracy peak."
                + summary,
                table(["run", "best epoch", "best acc", "drop to last", "argmax TPV epoch", "acc there", "argmin TPV epoch", "acc there"], rows)]
    return "\n\n".join(out)


def section_answers(r: dict, sweep: dict | None) -> str:
    """The issue's five questions, each answered with numbers from the JSON (details in the sections below)."""
    cells, corr = r["summary"]["cells"], r["correlations"]
    regs = list(r["sizes"]["regimes"])
    c = corr.get("hg_grad_norm|all|all")
    per_reg = ", ".join(f"{reg} {corr[f'hg_grad_norm|all|{reg}']['pearson_mean']:+.2f}" for reg in regs if f"hg_grad_norm|all|{reg}" in corr)
    out = [f"1. **Correlation.** Head-gradient norm vs test accuracy within a run: mean Pearson r {c['pearson_mean']:+.2f} "
           f"± {c['pearson_std']:.2f} over {c['n']} runs ({per_reg}); the paper reports -0.845 on ImageNet."]
    gaps = ", ".join(f"{reg} {pm(cells.get(f'hg_raw|all|{reg}'))}" for reg in regs)
    fam_cells = [v for k, v in cells.items() if k.startswith("hg_raw|") and v["family"] != "all"]
    worst = max(fam_cells, key=lambda v: v["gap_mean"]) if fam_cells else None
    fam = pm(cells.get("hg_raw_family|all|all"))
    out.append(f"2. **Gap to the oracle, universal preset** (points of test accuracy, mean ± std): {gaps}; all runs "
               f"{pm(cells.get('hg_raw|all|all'))}. Worst cell: {worst['family']}/{worst['regime']} {worst['gap_mean']:.2f}. "
               f"Per-family preset (leave-one-seed-out): {fam}. Paper: 4.24 ± 2.00 and about 1.12." if worst else "2. n/a")
    kinds = {s["name"]: s["kind"] for s in r["selectors"]}
    lines = []
    for reg in regs:
        last, val = cells.get(f"last|all|{reg}"), cells.get(f"val500|all|{reg}")
        if not last or not val:
            continue
        better = [n for n, k in kinds.items() if k in ("label-free", "remedy", "data-free") and f"{n}|all|{reg}" in cells
                  and cells[f"{n}|all|{reg}"]["gap_mean"] < last["gap_mean"] - 1e-9]
        both = [n for n in better if cells[f"{n}|all|{reg}"]["gap_mean"] < val["gap_mean"] - 1e-9]
        lines.append(f"{reg}: {len(better)} label-free selectors have a smaller mean gap than the last checkpoint "
                     f"({last['gap_mean']:.2f}); {len(both)} also beat the 500-image validation set ({val['gap_mean']:.2f})"
                     + (f": {', '.join(both)}" if both else ""))
    out.append("3. **Beating the last checkpoint and a 500-image validation set** (mean gap, all families): " + "; ".join(lines) + ".")
    if sweep:
        ratios = [p["test_tpv"] / p["train_tpv"] for p in sweep["points"]]
        out.append(f"4. **Train vs test TPV.** Over the {len(ratios)} regularisation-sweep MLPs, test/train Tr(H_eff) ratio median "
                   f"{np.median(ratios):.3f} (range {min(ratios):.3f} to {max(ratios):.3f}); teacher-student and the TPV benchmark's points are in the TPV section.")
    probe_ms = [m["signal_seconds_per_checkpoint"].get("probe") for m in r["run_meta"]]
    probe_ms = [1000 * x for x in probe_ms if x is not None and x == x]
    if probe_ms:
        out.append(f"5. **Cost.** The probe took a median {np.median(probe_ms):.0f} ms per checkpoint in these runs (256 images); "
                   "the Cost section has it per family and signal, against a training step, and the folder-scoring speed-up.")
    return "\n".join(out)


def render(r: dict, sweep: dict | None, img: Path, title: str, mem: dict | None = None) -> str:
    """``mem``: the results whose ``memorisation`` section is rendered (default ``r``; the full report
    takes it from the base + extended grid)."""
    img.mkdir(parents=True, exist_ok=True)
    memorisation = section_memorisation(mem or r, img)
    plots.trajectories(r, img / "evidence_trajectories.png")
    plots.gaps(r, img / "evidence_gaps.png", [s for s in MAIN_SELECTORS if f"{s}|all|all" in r["summary"]["cells"]])
    parts = [
        f"# {title}",
        "Generated by `python -m benchmarks.evidence report` from the JSON in `benchmarks/results/`; do not edit by hand. "
        "Every number below is read from those files.",
        partial_note(r),
        "## Answers", section_answers(r, sweep),
        "## Setup", section_setup(r),
        "## Does the probe reproduce the paper's correlation?", section_correlation(r),
        "## Gap to the oracle per family and regime", section_gaps(r),
        "## All selectors ranked", section_ranking(r),
        "## By regime", section_by_regime(r),
        "## Where label-free selection fails, and remedies", section_failures(r),
        "## TPV: train vs test, the U-shape, and TPV along a noisy run", section_tpv(r, sweep, img),
        *(["## Probe batch size", probe_size] if (probe_size := section_probe_size(r)) else []),
        *(["## Memorisation: prediction changes (Label Wave) and the selection rules", memorisation] if memorisation else []),
        "## Cost", cost_section(r, RESULTS),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


def build_report(grid: str = "full") -> Path:
    specs = full_grid() if grid == "full" else quick_grid()
    path = RESULTS / f"evidence_{grid}.json"
    cache = cache_for(grid)
    runs, _, _ = collect(specs, cache)
    if runs:  # runs reported before but no longer cached are rebuilt from the committed JSON (carried.py)
        write_results(build_results(grid, specs, COMMANDS[grid], cache, previous=load(path)), path)
    results = load(path)
    if results is None:
        raise RuntimeError(f"no cached runs and no {path}; run the grid first")
    mem = None
    if grid == "full":  # the memorisation section covers the base and the extended grid
        all_path = RESULTS / "evidence_all.json"
        if collect(all_grid(), cache)[0]:
            write_results(build_results("all", all_grid(), COMMANDS["all"], cache, previous=load(all_path)), all_path)
        mem = load(all_path)
    sweep = load(RESULTS / ("evidence_sweep.json" if grid == "full" else "evidence_sweep_quick.json"))
    out = DOCS / ("benchmarks.md" if grid == "full" else "benchmarks_quick.md")
    img = DOCS / "img" if grid == "full" else DOCS / "img" / "quick"
    title = "Evidence benchmark" if grid == "full" else "Evidence benchmark (quick grid: one seed, two families, short runs)"
    text = render(results, sweep, img, title, mem)
    if grid == "quick":
        text = text.replace("](img/", "](img/quick/")
    out.write_text(text)
    print(f"wrote {out} and {path}")
    return out
