"""Evidence on memorisation: prediction changes (Label Wave), label agreement and valfree's selection rules.

From each run's ``predictions.npz`` (the predicted classes of a fixed training subset at every
checkpoint, see trajectories.py) this module derives the columns the rules read (``pred_change``,
``label_agreement``), and the evaluation-only ones (agreement with the clean labels, the share of
mislabelled examples fitted to their wrong label). It then measures, per regime:

- every rule's gap to the best checkpoint next to the last checkpoint, the probe and the labelled sets
  (the gaps themselves come from the selectors, metrics.py);
- how often each rule's guard fired, and the runs where a rule is worse than the probe alone;
- the label-noise estimate against the true rate;
- PC's standard error against the subset size, and what the size does to each rule's mean gap;
- the cost of the prediction pass.

Nothing here tunes a rule: each rule runs with its default options.

The default rule's candidates and the decision, fixed before the CNN family and the missing ResNet
runs of the grid were trained (71 of 96 runs had been seen, the other 25 had not):

- ``guarded`` with the paper's plain PC minimum (a new minimum is any decrease), and
- ``guarded`` with a significant PC minimum (a new minimum must lie below the current one by more than
  1.96 standard errors of the difference, ``label_wave.significant_drop``): the remedy for the
  plateau of PC under a decaying learning rate, where slow drifts within noise kept the patience from
  running out;

the default becomes the second only if, on the whole grid, it meets the first and third criteria
(clean mean gap no worse than the last checkpoint's + 0.1 points; no run worse than the probe alone by
more than 1 point) and has the lower mean gap on noisy runs; otherwise the first stays. Both are
reported on the 71 seen runs and on the 25 unseen ones apart (:data:`CANDIDATES`).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from .selectors import DEFAULT_RULE, NOISE_ESTIMATOR, RULE_COLUMNS, RULES, Run, gap, label_agreement, label_noise_estimate, prediction_changes, rule_columns, select_by_rule

# The default rule's candidates (see the module docstring): name -> (rule, options).
CANDIDATES = {
    "guarded (plain minimum)": ("guarded", {"significant": False}),
    "guarded (significant minimum)": ("guarded", {"significant": True}),
}
# The runs not yet trained when the candidates were fixed: every other run of the grid had been seen.
UNSEEN_WHEN_FIXED = (
    "resnet-small-s0",
    "cnn-clean-s0",
    "cnn-noisy-s0",
    "cnn-small-s0",
    "cnn-noisy-constant-s0",
    "cnn-noisy-adam-s0",
    "cnn-noisy-step-s0",
    "cnn-noisy20-s0",
    "cnn-noisy60-s0",
    "cnn-asym40-s0",
    "cnn-tiny-s0",
    "cnn-clean-bn-highlr-s0",
    "cnn-clean-step-s0",
    "resnet-clean-s1",
    "resnet-noisy-s1",
    "resnet-small-s1",
    "cnn-clean-s1",
    "cnn-noisy-s1",
    "cnn-small-s1",
    "resnet-clean-s2",
    "resnet-noisy-s2",
    "resnet-small-s2",
    "cnn-clean-s2",
    "cnn-noisy-s2",
    "cnn-small-s2",
)
SUBSET_SIZES = (512, 1024, 2048, 4096)
SUBSET_DRAWS = 10  # random subsamples of the recorded subset per size (< the recorded size)
PLOT_PREFERENCE = ("clean", "noisy", "noisy-step", "tiny", "asym40", "clean-bn-highlr", "clean-step", "noisy60",
                   "noisy-constant", "noisy-adam", "noisy20", "small")


def attach_predictions(run: Run, pred: dict) -> Run:
    """``run`` with the prediction columns added to its rows and the arrays kept on ``run.pred``."""
    steps = [int(s) for s in pred["steps"]]
    if steps != [int(s) for s in run.steps]:
        raise ValueError(f"{run.name}: predictions.npz steps {steps[:3]}... differ from the trajectory's")
    p = pred["pred"]
    given, true = pred["given"], pred["true"]
    wrong = given != true
    pc = prediction_changes(p)
    la = label_agreement(p, given)
    la_true = label_agreement(p, true)
    # Evaluation only: the share of the subset's mislabelled examples predicted as their wrong label.
    memorised = (p[:, wrong] == given[wrong][None, :]).mean(axis=1) if wrong.any() else np.zeros(len(p))
    for i, row in enumerate(run.rows):
        row.update(pred_change=float(pc[i]), label_agreement=float(la[i]), la_true=float(la_true[i]), memorised=float(memorised[i]),
                   pred_subset=float(p.shape[1]))
    run.pred = pred
    return run


def _columns(run: Run, pred_matrix=None, given=None) -> dict[str, np.ndarray]:
    """The rules' columns; with ``pred_matrix``, PC, label agreement and the subset size from those columns."""
    cols = rule_columns(run)
    if pred_matrix is not None:
        cols["pred_change"] = prediction_changes(pred_matrix)
        cols["label_agreement"] = label_agreement(pred_matrix, given)
        cols["pred_subset"] = np.full(len(pred_matrix), float(pred_matrix.shape[1]))
    return cols


def _true_rate(regime_meta: dict) -> float:
    return float(regime_meta.get("label_noise", 0.0))


def has_predictions(run: Run) -> bool:
    """Whether the run has the prediction columns (recorded, or carried over from the committed JSON)."""
    return run.pred is not None or bool(np.isfinite(run.series("pred_change")[1:]).all())


def rule_details(runs: list[Run]) -> dict:
    """Per run and rule: the choice, its gap, whether the guard fired, and the rule's reason."""
    out = {}
    for run in runs:
        if not has_predictions(run):
            continue
        cols = _columns(run)
        rec = {}
        for rule in RULES:
            choice = select_by_rule(rule, run.steps, cols)
            rec[rule] = {"index": int(choice.index), "step": float(choice.step), "gap": gap(run, int(choice.index)),
                         "guard_fired": None if choice.guard_fired is None else bool(choice.guard_fired),
                         "reason": str(choice.reason)}
        out[run.name] = rec
    return out


def candidate_results(runs: list[Run], regimes: dict) -> dict:
    """Each default-rule candidate's gap per run, and the pooled figures the decision reads, on the
    runs seen when the candidates were fixed (rebuilt from the committed results) and on the unseen."""
    per_run = {}
    for run in runs:
        if not has_predictions(run):
            continue
        cols = _columns(run)
        probe = gap(run, int(select_by_rule("probe", run.steps, cols).index))
        rec = {"seen": run.name not in UNSEEN_WHEN_FIXED, "noisy": _true_rate(regimes.get(run.regime, {})) > 0,
               "probe": probe, "last": gap(run, len(run.rows) - 1)}
        for name, (rule, options) in CANDIDATES.items():
            choice = select_by_rule(rule, run.steps, cols, **options)
            rec[name] = {"gap": gap(run, int(choice.index)), "guard_fired": bool(choice.guard_fired)}
        per_run[run.name] = rec
    pooled = {}
    for part, keep in (("seen", lambda r: r["seen"]), ("unseen", lambda r: not r["seen"]), ("all", lambda r: True)):
        for group, noisy in (("clean", False), ("noisy", True)):
            members = [r for r in per_run.values() if keep(r) and r["noisy"] == noisy]
            if not members:
                continue
            cell = {"runs": len(members), "last": float(np.mean([r["last"] for r in members])),
                    "probe": float(np.mean([r["probe"] for r in members]))}
            for name in CANDIDATES:
                cell[name] = float(np.mean([r[name]["gap"] for r in members]))
                cell[f"{name}|fired"] = int(sum(r[name]["guard_fired"] for r in members))
                cell[f"{name}|worse_than_probe"] = int(sum(r[name]["gap"] > r["probe"] + 1 for r in members))
            pooled[f"{part}|{group}"] = cell
    return {"candidates": {k: {"rule": v[0], "options": v[1]} for k, v in CANDIDATES.items()}, "per_run": per_run,
            "pooled": pooled, "decision": candidate_decision(pooled)}


def candidate_decision(pooled: dict) -> dict:
    """The decision rule of the module docstring, applied to the whole grid's pooled figures."""
    clean, noisy = pooled.get("all|clean"), pooled.get("all|noisy")
    if not (clean and noisy):
        return {"chosen": None, "why": "the grid lacks clean or noisy runs"}
    meets = {}
    for name in CANDIDATES:
        worse = clean[f"{name}|worse_than_probe"] + noisy[f"{name}|worse_than_probe"]
        meets[name] = {"clean_ok": clean[name] <= clean["last"] + 0.1, "none_worse": worse == 0, "noisy_gap": noisy[name]}
    plain, significant = list(CANDIDATES)
    m = meets[significant]
    chosen = significant if (m["clean_ok"] and m["none_worse"] and m["noisy_gap"] < meets[plain]["noisy_gap"]) else plain
    return {"chosen": chosen, "criteria": meets}


def noise_estimates(runs: list[Run], regimes: dict) -> dict:
    """Per run: the label-noise estimate (estimate, low, high) against the regime's rate and the subset's."""
    out = {}
    for run in runs:
        if not has_predictions(run):
            continue
        est = label_noise_estimate(run.steps, _columns(run))
        if run.pred is not None:
            subset_rate = float(np.mean(run.pred["given"] != run.pred["true"]))
        else:  # a carried run: the rate among its subset's labels, as reported
            subset_rate = float((run.carried.get("noise") or {}).get("subset_rate", float("nan")))
        true = _true_rate(regimes.get(run.regime, {}))
        out[run.name] = {"regime": run.regime, "family": run.family, "true_rate": true, "subset_rate": subset_rate,
                         "estimate": None if est is None else float(est[0]),
                         "low": None if est is None else float(est[1]), "high": None if est is None else float(est[2])}
    return out


def subset_size_study(runs: list[Run], regimes: dict, sizes=SUBSET_SIZES, draws=SUBSET_DRAWS) -> dict:
    """PC's standard error and each rule's gap when PC/LA come from a random part of the recorded subset.

    For a size n below the recorded size S, ``draws`` subsets of n columns are drawn without
    replacement (seeded). Two standard errors are reported per size, averaged over checkpoints t >= 1
    and runs: the binomial sqrt(PC_t (1 - PC_t) / n) (a subset drawn from a large training set), and the
    spread of PC_t over the draws divided by the finite-population factor sqrt(1 - n / S) (an
    empirical check of the first; n/a at n = S).
    """
    per_size = {n: {"binom": [], "empirical": [], "pc_median": [], "runs": 0} for n in sizes}
    gaps = defaultdict(lambda: defaultdict(list))  # (rule, group) -> size -> per-draw mean gaps over runs
    per_run_gaps = defaultdict(lambda: defaultdict(dict))  # rule -> size -> run -> mean gap over draws
    for run in runs:
        if run.pred is None:
            continue
        p, given = run.pred["pred"], run.pred["given"]
        S = p.shape[1]
        for n in sizes:
            if n > S:
                continue
            idx_list = [np.arange(S)] if n == S else [np.sort(np.random.default_rng(d).choice(S, n, replace=False)) for d in range(draws)]
            pcs = np.array([prediction_changes(p[:, idx]) for idx in idx_list])  # draws x T
            pc_full = prediction_changes(p)
            per_size[n]["runs"] += 1
            per_size[n]["binom"].append(float(np.nanmean(np.sqrt(pc_full[1:] * (1 - pc_full[1:]) / n))))
            per_size[n]["pc_median"].append(float(np.nanmedian(pc_full[1:])))
            if n < S:
                per_size[n]["empirical"].append(float(np.nanmean(pcs[:, 1:].std(axis=0, ddof=1)) / np.sqrt(1 - n / S)))
            for rule in RULES:
                g = [gap(run, int(select_by_rule(rule, run.steps, _columns(run, p[:, idx], given[idx])).index)) for idx in idx_list]
                per_run_gaps[rule][n][run.name] = (float(np.mean(g)), g)
    out_sizes = []
    for n in sizes:
        c = per_size[n]
        out_sizes.append({"size": n, "runs": c["runs"],
                          "pc_stderr_binomial": float(np.mean(c["binom"])) if c["binom"] else float("nan"),
                          "pc_stderr_empirical": float(np.mean(c["empirical"])) if c["empirical"] else float("nan"),
                          "pc_median": float(np.mean(c["pc_median"])) if c["pc_median"] else float("nan")})
    # Each rule's mean gap per size, over the runs whose recorded subset holds every size (so that the
    # sizes compare the same runs), per group (clean / noisy labels) and overall.
    full_runs = [r for r in runs if r.pred is not None and r.pred["pred"].shape[1] >= max(sizes)]
    groups = {"clean": [r for r in full_runs if _true_rate(regimes.get(r.regime, {})) == 0],
              "noisy": [r for r in full_runs if _true_rate(regimes.get(r.regime, {})) > 0], "all": full_runs}
    rule_gaps = {}
    for rule in RULES:
        for group, members in groups.items():
            for n in sizes:
                vals = [per_run_gaps[rule][n][r.name] for r in members if r.name in per_run_gaps[rule][n]]
                if not vals:
                    continue
                draws_matrix = np.array([v[1] if len(v[1]) > 1 else v[1] * draws for v in vals])  # runs x draws
                per_draw_mean = draws_matrix.mean(axis=0)
                rule_gaps[f"{rule}|{group}|{n}"] = {
                    "rule": rule, "group": group, "size": n, "runs": len(vals),
                    "gap_mean": float(np.mean([v[0] for v in vals])),
                    "gap_draw_std": float(per_draw_mean.std(ddof=1)) if n < max(sizes) else 0.0,
                    "gap_worst": float(np.max([v[0] for v in vals])),
                }
    return {"sizes": out_sizes, "draws": draws, "rule_gaps": rule_gaps}


def prediction_cost(meta: list[dict], runs: list[Run]) -> dict:
    """The prediction pass per checkpoint against a training step, the run's training and the probe.

    - ``pred_ms``: CPU ms of one prediction pass (eval-mode forward and argmax on the subset);
    - ``train_step_ms``: wall ms of one training step (train_seconds / total_steps);
    - ``pred_in_steps``: the pass in training steps (wall over wall, taken in the same process);
    - ``share_of_training``: all the run's passes over its training time (wall), at 30 checkpoints;
    - ``probe_ms``: CPU ms of the probe (256 images) in the signals pass;
    - ``score_share``: the part of the pass the probe batch does not already cover, (S - 256)/S of it,
      as a share of a checkpoint's scoring with it (probe + that extra), checkpoint loading left out.
    """
    fam_of = {r.name: r.family for r in runs}
    rows = defaultdict(lambda: defaultdict(list))
    for m in meta:
        if "pred_cpu_seconds" not in m or m["name"] not in fam_of:
            continue
        fam, k, S = fam_of[m["name"]], m["checkpoints"], m["pred_subset"]
        d = rows[fam]
        d["pred_ms"].append(1000 * m["pred_cpu_seconds"] / k)
        d["subset"].append(S)
        step = m["train_seconds"] / m["total_steps"]
        d["train_step_ms"].append(1000 * step)
        d["pred_in_steps"].append(m["pred_seconds"] / k / step)
        d["share_of_training"].append(m["pred_seconds"] / m["train_seconds"])
        probe = m["signal_cpu_seconds_per_checkpoint"].get("probe")
        if probe is not None and probe == probe:
            d["probe_ms"].append(1000 * probe)
            extra = m["pred_cpu_seconds"] / k * max(S - 256, 0) / S
            d["score_share"].append(extra / (probe + extra))
    return {fam: {k: float(np.median(v)) for k, v in d.items()} | {"runs": len(d["pred_ms"])} for fam, d in rows.items()}


def plot_runs(runs: list[Run], limit: int = 8) -> list[str]:
    """Representative runs for the PC plots: seed 0 (or the lowest seed), one per regime in a fixed
    preference order (clean and noisy first), MLP first, then ViT, then the others."""
    fam_order = {"mlp": 0, "vit": 1, "cnn": 2, "resnet": 3}
    chosen = []
    for reg in PLOT_PREFERENCE + tuple(sorted({r.regime for r in runs} - set(PLOT_PREFERENCE))):
        cands = sorted((r for r in runs if r.regime == reg and has_predictions(r)), key=lambda r: (r.seed, fam_order.get(r.family, 9)))
        if cands:
            chosen.append(cands[0].name)
        if len(chosen) >= limit:
            break
    # a second family on the noisy base regime when room is left
    return chosen


def memorisation_results(runs: list[Run], meta: list[dict], regimes: dict) -> dict | None:
    if not any(has_predictions(r) for r in runs):
        return None
    return {
        "rules": list(RULES), "default_rule": DEFAULT_RULE, "noise_estimator": NOISE_ESTIMATOR,
        "rule_columns": dict(RULE_COLUMNS),
        "details": rule_details(runs),
        "noise": noise_estimates(runs, regimes),
        "subset_size": subset_size_study(runs, regimes),
        "cost": prediction_cost(meta, runs),
        "plot_runs": plot_runs(runs),
        "subset": {r.name: int(r.series("pred_subset")[0]) for r in runs if has_predictions(r)},
        "candidates": candidate_results(runs, regimes),
    }
