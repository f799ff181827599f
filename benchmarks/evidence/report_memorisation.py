"""The report's memorisation section, rendered from a results JSON's ``memorisation`` key
and its per-run choices. Numbers only; the lead draws the conclusions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from . import plots

LABELLED = ("val100", "val500", "val1000")


def _f(x, nd=2) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{x:.{nd}f}"


def _table(header, rows) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])


def _groups(r: dict) -> list[tuple[str, list[str]]]:
    """(label, run names) per regime in grid order, then pooled clean / noisy / all."""
    regimes = r["sizes"]["regimes"]
    by_reg = {}
    for name, v in r["per_run"].items():
        by_reg.setdefault(v["regime"], []).append(name)
    out = [(reg, by_reg[reg]) for reg in regimes if reg in by_reg]
    clean = [n for reg, ns in out if regimes[reg]["label_noise"] == 0 for n in ns]
    noisy = [n for reg, ns in out if regimes[reg]["label_noise"] > 0 for n in ns]
    return out + [("**clean, pooled**", clean), ("**noisy, pooled**", noisy), ("**all**", clean + noisy)]


def _gaps(r: dict, names: list[str], sel: str) -> list[float]:
    return [r["per_run"][n]["chosen"][sel]["gap"] for n in names if sel in r["per_run"][n]["chosen"]]


def _section_candidates(mem: dict) -> list[str]:
    """How the default rule was chosen: the candidates fixed before the unseen runs were trained, their
    pooled gaps on the seen and the unseen runs, and the decision rule's verdict."""
    cand = mem.get("candidates")
    if not cand:
        return []
    names = list(cand["candidates"])
    rows = []
    for part in ("seen", "unseen", "all"):
        for group in ("clean", "noisy"):
            cell = cand["pooled"].get(f"{part}|{group}")
            if not cell:
                continue
            rows.append([part, group, str(cell["runs"]), _f(cell["last"]), _f(cell["probe"])] +
                        [f"{_f(cell[n])} (fired {cell[f'{n}|fired']}, worse {cell[f'{n}|worse_than_probe']})" for n in names])
    decision = cand["decision"]
    verdict = (f"Decision (the rule in `benchmarks/evidence/memorisation.py`, applied to all runs): **{decision['chosen']}**." if decision.get("chosen")
               else f"No decision: {decision.get('why')}.")
    crit = decision.get("criteria", {})
    detail = "; ".join(f"{n}: clean criterion {'met' if c['clean_ok'] else 'not met'}, "
                       f"{'no run' if c['none_worse'] else 'some run'} worse than the probe by more than 1 point, "
                       f"noisy mean gap {c['noisy_gap']:.2f}" for n, c in crit.items())
    return ["### Choosing the default rule",
            "Two candidates for the default were fixed, with the decision rule, before the CNN family and the remaining ResNet "
            "runs were trained (`UNSEEN_WHEN_FIXED` in `benchmarks/evidence/memorisation.py`): `guarded` with the paper's plain "
            "minimum of smoothed PC, and `guarded` with a significant minimum (a new minimum must lie 1.96 standard errors of "
            "the difference below the current one, `valfree.selection.label_wave.significant_drop`). The second becomes the "
            "default only if, on all runs, it meets the clean criterion and leaves no run worse than the probe by more than "
            "1 point, and has the lower noisy mean gap. Mean gap in points (runs where the guard fired; runs worse than the "
            "probe alone by more than 1 point); *seen*: the runs looked at before fixing the candidates, *unseen*: the others.",
            _table(["runs", "labels", "n", "last", "probe", *names], rows), verdict + (f" {detail}." if detail else "")]


def section_memorisation(r: dict, img: Path, img_prefix: str = "img/") -> str:
    mem = r.get("memorisation")
    if not mem:
        return ""
    rules = mem["rules"]
    rule_sels = [f"rule:{x}" for x in rules]
    sels = ["last", "hg_raw", *rule_sels, *LABELLED]
    regimes = r["sizes"]["regimes"]
    groups = _groups(r)
    out = [
        f"Command: `{r['command']}` (results: `benchmarks/results/evidence_{r['grid']}.json`). Each run records, at every "
        "checkpoint, the predicted classes (eval mode, argmax) of a fixed seeded subset of its training images, "
        "min(4096, training set) of them, a superset of the probe batch (`predictions.npz`). From it: **PC** (the share "
        "whose class changed since the previous checkpoint; no label read) and **label agreement** (the share predicted as "
        "the label it was trained on). Every valfree rule in `valfree.selection.rules.RULES` runs with its default options "
        f"({', '.join(f'`{x}`' for x in rules)}; the library's default: `{mem.get('default_rule')}`), on the columns "
        "`grad_norm` (the probe), `pred_change`, `label_agreement` and `pred_subset` (the subset size). Nothing below was tuned "
        "on this grid.",
    ]
    fams = {}
    for name, v in r["per_run"].items():
        fams.setdefault(v["regime"], set()).add(f"{v['family']}")
    regs = "; ".join(
        f"**{k}** ({', '.join(sorted(fams.get(k, [])))}): {v.get('description', '')}" for k, v in regimes.items())
    meta = r.get("run_meta", [])
    wall = sum(m["train_seconds"] + m["eval_seconds"] for m in meta) / 60
    cpu = sum(m["cpu_seconds"] for m in meta if m.get("cpu_seconds") == m.get("cpu_seconds")) / 60
    out.append(
        f"Grid: {r['runs_finished']} of {r['runs_expected']} runs finished, 30 checkpoints each. Regimes (families with a finished "
        f"run): {regs}. The extended regimes train the MLP and the ViT on seeds 0-2 and the CNN on seed 0; the ViT (LayerNorm) sits "
        "out the BatchNorm regime, where the MLP gets BatchNorm after each hidden layer; `noisy-step` equals `noisy-constant` "
        "up to half the run by construction. Extended runs compute the probe, its batch-size study and the pseudo-label probe, not "
        "Tr(H_eff) or WeightWatcher. Training with per-checkpoint evaluation (and the prediction pass): "
        f"{wall:.0f} wall-clock minutes summed over runs, {cpu:.0f} CPU-minutes (two niced workers on a 2-core machine that ran "
        "other jobs).")
    if r.get("runs_missing"):
        out.append(f"**Missing runs ({len(r['runs_missing'])}):** {', '.join(r['runs_missing'])}.")
    if r.get("runs_carried"):
        out.append(f"{len(r['runs_carried'])} runs were not in this machine's cache and were rebuilt from the committed results' "
                   "per-checkpoint series (`benchmarks/evidence/carried.py`): every rule and every selector whose input those "
                   "series hold ran again on them with the current code; the 100- and 1000-image labelled sets' choices and the "
                   "studies that resample the prediction matrices come from the cached runs or as reported before.")
    # Gap table per regime: mean (worst run).
    rows = []
    for label, names in groups:
        noise = regimes[label]["label_noise"] if label in regimes else None
        kind = "" if noise is None else (f"{regimes[label]['noise_type'] if 'noise_type' in regimes[label] else 'symmetric'} {100 * noise:.0f} %" if noise else "clean")
        row = [label, kind, str(len(names))]
        for sel in sels:
            g = _gaps(r, names, sel)
            row.append(f"{np.mean(g):.2f} ({np.max(g):.2f})" if g else "n/a")
        best = [100 * r["per_run"][n]["chosen"]["oracle"]["test_acc"] for n in names]
        row.append(f"{np.mean(best):.2f}")
        rows.append(row)
    out += ["### Gap to the best checkpoint per regime",
            "Points of test accuracy (10k test images) below the best checkpoint of the run: mean over runs (worst run). "
            "*hg_raw* is the probe alone (universal preset); the oracle column is the best checkpoint's test accuracy (%).",
            _table(["regime", "labels", "runs", *sels, "oracle acc"], rows)]
    # Per family, clean and noisy pooled.
    rows = []
    fam_names = sorted({v["family"] for v in r["per_run"].values()})
    for fam in fam_names:
        for label, members in (("clean", "**clean, pooled**"), ("noisy", "**noisy, pooled**")):
            names = [n for n in dict(groups)[members] if r["per_run"][n]["family"] == fam]
            if not names:
                continue
            rows.append([fam, label, str(len(names))] + [f"{np.mean(g):.2f} ({np.max(g):.2f})" if (g := _gaps(r, names, sel)) else "n/a"
                                                         for sel in ["last", "hg_raw", *rule_sels, "val500"]])
    out += ["Per family (all regimes with clean or with noisy labels pooled): mean gap (worst run).",
            _table(["family", "labels", "runs", "last", "hg_raw", *rule_sels, "val500"], rows)]
    # The three acceptance criteria of the default rule, per rule, on the pooled runs.
    pooled = dict(groups)
    clean, noisy = pooled["**clean, pooled**"], pooled["**noisy, pooled**"]
    rows = []
    for sel in rule_sels:
        c, c_last = _gaps(r, clean, sel), _gaps(r, clean, "last")
        n, n_val = _gaps(r, noisy, sel), _gaps(r, noisy, "val500")
        worse = sum(1 for name in r["per_run"] if sel in r["per_run"][name]["chosen"] and "hg_raw" in r["per_run"][name]["chosen"]
                    and r["per_run"][name]["chosen"][sel]["gap"] > r["per_run"][name]["chosen"]["hg_raw"]["gap"] + 1.0)
        ok1 = bool(c) and np.mean(c) <= np.mean(c_last) + 0.1
        ok2 = bool(n) and np.mean(n) <= np.mean(n_val) + 1.0
        rows.append([f"`{sel}`" + (" (library default)" if sel == f"rule:{mem.get('default_rule')}" else ""),
                     f"{np.mean(c):.2f} vs {np.mean(c_last) + 0.1:.2f}: {'met' if ok1 else 'not met'}" if c else "n/a",
                     f"{np.mean(n):.2f} vs {np.mean(n_val) + 1.0:.2f}: {'met' if ok2 else 'not met'}" if n else "n/a",
                     f"{worse}: {'met' if worse == 0 else 'not met'}"])
    out += ["### The default's acceptance criteria, per rule",
            "On every finished run of this grid, base and extended pooled: (1) clean runs, mean gap no worse than the last "
            "checkpoint's + 0.1; (2) noisy runs, mean gap within 1 point of the 500-image labelled set's; (3) no run worse than "
            "the probe alone by more than 1 point.",
            _table(["rule", "(1) clean: mean gap vs last + 0.1", "(2) noisy: mean gap vs val500 + 1", "(3) runs worse than probe by >1"], rows)]
    out += _section_candidates(mem)
    # Worse than the probe by more than 1 point, and guard firing.
    guarded = [x for x in rules if any(d[x]["guard_fired"] is not None for d in mem["details"].values())]
    rows = []
    for label, names in groups:
        row = [label, str(len(names))]
        for sel in rule_sels:
            worse = [n for n in names if sel in r["per_run"][n]["chosen"] and "hg_raw" in r["per_run"][n]["chosen"]
                     and r["per_run"][n]["chosen"][sel]["gap"] > r["per_run"][n]["chosen"]["hg_raw"]["gap"] + 1.0]
            row.append(str(len(worse)))
        for rule in guarded:
            fired = [mem["details"][n][rule]["guard_fired"] for n in names if n in mem["details"]]
            known = [x for x in fired if x is not None]
            row.append(f"{sum(known)}/{len(known)}" if known else "n/a")
        rows.append(row)
    out += ["### Runs where a rule is worse than the probe alone, and how often the guard fired",
            "Runs where the rule's gap exceeds the probe's (hg_raw) by more than 1 point; then, per rule, runs where its "
            f"memorisation guard fired / runs (the rules with a guard: {', '.join(f'`{x}`' for x in guarded) or 'none'}).",
            _table(["regime", "runs", *[f"{s} worse by >1" for s in rule_sels], *[f"{x} guard fired" for x in guarded]], rows)]
    worst = []
    for sel in rule_sels:
        bad = sorted(((r["per_run"][n]["chosen"][sel]["gap"] - r["per_run"][n]["chosen"]["hg_raw"]["gap"], n) for n in r["per_run"]
                      if sel in r["per_run"][n]["chosen"] and "hg_raw" in r["per_run"][n]["chosen"]), reverse=True)
        bad = [f"{n} (+{d:.2f})" for d, n in bad if d > 1.0]
        worst.append(f"- `{sel}`: " + (", ".join(bad) if bad else "none"))
    out += ["Runs worse than the probe by more than 1 point (rule gap minus probe gap):", "\n".join(worst)]
    # Where the library's default rule still fails.
    default = mem.get("default_rule")
    if default in rules:
        fails = sorted(((mem["details"][n][default]["gap"], n) for n in mem["details"]
                        if mem["details"][n][default]["gap"] > 2.0), reverse=True)
        rows = [[n, _f(g), _f(r["per_run"][n]["chosen"]["val500"]["gap"]) if "val500" in r["per_run"][n]["chosen"] else "n/a",
                 str(mem["details"][n][default]["index"]), str(r["per_run"][n]["chosen"]["oracle"]["index"]),
                 {None: "n/a", True: "yes", False: "no"}[mem["details"][n][default]["guard_fired"]],
                 mem["details"][n][default]["reason"].replace("|", "/")] for g, n in fails]
        out += [f"### Where the default rule (`{default}`) still fails",
                f"Runs where `{default}` is more than 2 points below the best checkpoint ({len(rows)} of {len(mem['details'])}), "
                "worst first, with the 500-image labelled set's gap, the chosen and the best checkpoint's positions (0-29), "
                "whether the guard fired, and the rule's own reason.",
                _table(["run", "gap", "val500 gap", "chosen", "best", "guard", "reason"], rows) if rows else "None."]
    # Plots.
    names = mem.get("plot_runs", [])
    path = plots.prediction_changes(r, names, img / "evidence_prediction_changes.png")
    if path:
        out += ["### PC and label agreement along representative runs",
                "PC (purple, left axis), label agreement with the given labels (orange) and test accuracy (black, right axis) "
                "against the epoch; vertical lines: the probe's choice (blue dashed), each rule's (dotted, legend order), the best "
                "checkpoint (black). A title lists the rules whose guard fired.",
                f"![prediction changes]({img_prefix}evidence_prediction_changes.png)"]
        reasons = []
        for n in names:
            for rule, d in mem["details"].get(n, {}).items():
                reasons.append([n, rule, str(d["index"]), _f(d["gap"]), {None: "n/a", True: "yes", False: "no"}[d["guard_fired"]], d["reason"].replace("|", "/")])
        out.append(_table(["run", "rule", "index", "gap", "guard", "reason"], reasons))
    # Label-noise estimate.
    rows = []
    for label, names in groups:
        est = [mem["noise"][n] for n in names if n in mem["noise"]]
        have = [e for e in est if e["estimate"] is not None]
        if not est:
            continue
        true = sorted({e["true_rate"] for e in est})
        cover = [e["low"] <= e["subset_rate"] <= e["high"] for e in have]
        rows.append([label, "/".join(f"{100 * t:.0f} %" for t in true), f"{100 * np.mean([e['subset_rate'] for e in est]):.1f} %",
                     f"{len(have)}/{len(est)}",
                     f"{100 * np.mean([e['estimate'] for e in have]):.1f} %" if have else "n/a",
                     f"[{100 * np.mean([e['low'] for e in have]):.1f}, {100 * np.mean([e['high'] for e in have]):.1f}] %" if have else "n/a",
                     f"{100 * np.mean([abs(e['estimate'] - e['subset_rate']) for e in have]):.1f}" if have else "n/a",
                     f"{sum(cover)}/{len(cover)}" if have else "n/a"])
    out += ["### Label-noise estimate against the true rate",
            f"The estimate ({mem.get('noise_estimator', 'label_noise_estimate')}) per run against the regime's rate and the rate actually present in the recorded subset "
            "(the estimate's target). *estimated*: runs where it returned an estimate; *covered*: runs whose interval holds the "
            "subset's rate. Mean absolute error in points.",
            _table(["regime", "true rate", "rate in subset", "estimated", "mean estimate", "mean interval", "MAE", "covered"], rows)]
    # Subset size.
    ss = mem["subset_size"]
    rows = [[str(s["size"]), str(s["runs"]), _f(s["pc_stderr_binomial"], 4), _f(s["pc_stderr_empirical"], 4), _f(s["pc_median"], 4)]
            for s in ss["sizes"]]
    out += ["### PC's standard error against the subset size",
            f"Each size n below the recorded subset S is drawn {ss['draws']} times (without replacement, seeded) from the recorded "
            "subset, and PC and label agreement are recomputed on it. *binomial*: sqrt(PC (1 - PC) / n), averaged over checkpoints "
            "and runs (a subset drawn from a large training set); *empirical*: the spread of PC over the draws divided by "
            "sqrt(1 - n/S) (a check of the binomial; n/a at n = S). Runs whose training set is smaller than n are left out of that row.",
            _table(["n", "runs", "PC stderr (binomial)", "PC stderr (empirical)", "median PC"], rows)]
    sizes = [s["size"] for s in ss["sizes"]]
    rows = []
    for rule in rules:
        for group in ("clean", "noisy", "all"):
            cells = [ss["rule_gaps"].get(f"{rule}|{group}|{n}") for n in sizes]
            if not any(cells):
                continue
            rows.append([rule, group, str(next(c["runs"] for c in cells if c))] +
                        [f"{c['gap_mean']:.2f} ± {c['gap_draw_std']:.2f} ({c['gap_worst']:.2f})" if c else "n/a" for c in cells])
    out += ["Each rule's mean gap when PC and label agreement come from n images (runs with a recorded subset of "
            f"{max(sizes)}): mean over runs of the mean over draws ± the spread of the grid mean over draws (worst run's mean).",
            _table(["rule", "labels", "runs", *[f"n={n}" for n in sizes]], rows)]
    # Cost.
    cost = mem.get("cost") or {}
    if cost:
        rows = [[fam, str(c["runs"]), f"{c['subset']:.0f}", _f(c["pred_ms"], 1), _f(c["train_step_ms"], 1), _f(c["pred_in_steps"], 1),
                 f"{100 * c['share_of_training']:.1f} %", _f(c.get("probe_ms"), 1),
                 f"{100 * c['score_share']:.0f} %" if "score_share" in c else "n/a"] for fam, c in cost.items()]
        out += ["### Cost of the prediction pass",
                "Per checkpoint, medians over runs (one torch thread; the machine ran other jobs, so wall times are upper "
                "bounds): the prediction pass on the subset (eval-mode forward in batches of 256 and argmax, CPU ms); one "
                "training step (batch 128, wall ms); the pass in training steps; all 30 passes of a run as a share of its "
                "training time (this grid checkpoints every 13 to 104 steps, so the share is large; it scales with the "
                "checkpoint interval); the probe on 256 images (CPU ms, signals pass); and, for `valfree score`, the part of "
                "the pass the probe batch does not already cover ((S - 256)/S of it) as a share of scoring one checkpoint "
                "with it (probe + that extra; checkpoint loading left out).",
                _table(["family", "runs", "subset", "prediction pass (ms)", "training step (ms)", "pass in steps",
                        "share of training", "probe (ms)", "extra share of scoring"], rows)]
    return "\n\n".join(out)
