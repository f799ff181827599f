"""Markdown tables and plots of the beyond-classification results, from benchmarks/results/beyond_*.json.

    python -m benchmarks.beyond.report      # prints the tables that docs/beyond.md shows, redraws docs/img/beyond_*.png
"""

from __future__ import annotations

import json

from .common import RESULTS, plot

# task -> (title, {panel label: row column})
PLOTS = {
    "segmentation": ("Segmentation: FCN, Fashion-MNIST canvases; 1x1 classifier, per-pixel CE", {"test mIoU": "miou"}),
    "detection": ("Detection: tiny CenterNet; focal heatmap + 0.1 L1 box, joint gradient", {"test mAP@0.5": "map50"}),
    "diffusion": ("Diffusion: tiny DDPM, 14x14 Fashion-MNIST; 1x1 head, eps-MSE, seed 0",
                  {"held-out eps-MSE": "heldout_mse", "classifier FID": "classifier_fid"}),
    "diffusion_v": ("Diffusion: tiny DDPM, 14x14 Fashion-MNIST; 1x1 head, v-MSE, seed 0",
                    {"held-out v-MSE": "heldout_mse", "classifier FID": "classifier_fid"}),
    "language": ("LM: tiny GPT-2, Debian licence texts; tied lm_head, next-token CE", {"held-out perplexity": "heldout_perplexity"}),
    "language_stdlib": ("LM: tiny GPT-2, Python stdlib sources; tied lm_head, next-token CE",
                        {"held-out perplexity": "heldout_perplexity"}),
}


def plot_from_json(task: str):
    """docs/img/beyond_TASK.png from the task's JSON result."""
    record = json.loads((RESULTS / f"beyond_{task}.json").read_text())
    rows = record["rows"]
    title, panels = PLOTS[task]
    return plot(task, [r["step"] for r in rows], [r["grad_norm"] for r in rows],
                {label: [r[col] for r in rows] for label, col in panels.items()}, title)

# (task, metric key inside "summary" or None when the summary is flat, metric label, rows' metric column)
SERIES = [
    ("segmentation", None, "test mIoU", "miou"),
    ("detection", None, "test mAP@0.5", "map50"),
    ("diffusion", "heldout_mse", "held-out eps-MSE", "heldout_mse"),
    ("diffusion", "classifier_fid", "classifier-feature FID", "classifier_fid"),
    ("diffusion_v", "heldout_mse", "held-out v-MSE", "heldout_mse"),
    ("diffusion_v", "classifier_fid", "classifier-feature FID", "classifier_fid"),
    ("language", None, "held-out perplexity", "heldout_perplexity"),
    ("language_stdlib", None, "held-out perplexity", "heldout_perplexity"),
]


def fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}g}"


def tables() -> str:
    corr = ["| task | metric (better) | n | Pearson r | Spearman rho (p) | Kendall tau | sign: smaller probe goes with |",
            "|---|---|---|---|---|---|---|"]
    sel = ["| task | metric | oracle | last checkpoint (gap) | tail argmin (gap) | tail argmax (gap) | best in tail window (gap) |",
           "|---|---|---|---|---|---|---|"]
    for task, key, label, _ in SERIES:
        record = json.loads((RESULTS / f"beyond_{task}.json").read_text())
        summary = record["summary"][key] if key else record["summary"]
        higher = record["higher_is_better"]
        g = summary["grad_norm"]
        c = g["correlation"]
        # A negative correlation with a higher-is-better metric (or positive with lower-is-better)
        # means a smaller probe goes with a better model.
        better_when_small = (c["spearman"] < 0) == higher
        corr.append(
            f"| {task} | {label} ({'higher' if higher else 'lower'}) | {c['n']} | {c['pearson']:+.3f} | "
            f"{c['spearman']:+.3f} ({c['spearman_p']:.1g}) | {c['kendall']:+.3f} | "
            f"{'a better' if better_when_small else 'a worse'} model |"
        )
        o, last, win = summary["oracle"], summary["last"], summary["tail_window_oracle"]
        mn, mx = g["select_min"], g["select_max"]
        sel.append(
            f"| {task} | {label} | {fmt(o['metric'])} @ {o['step']:.0f} | {fmt(last['metric'])} ({fmt(last['gap_to_oracle'], 3)}) | "
            f"{fmt(mn['metric'])} @ {mn['step']:.0f} ({fmt(mn['gap_to_oracle'], 3)}) | "
            f"{fmt(mx['metric'])} @ {mx['step']:.0f} ({fmt(mx['gap_to_oracle'], 3)}) | "
            f"{fmt(win['metric'])} @ {win['step']:.0f} ({fmt(win['gap_to_oracle'], 3)}) |"
        )
    return "\n".join(corr) + "\n\n" + "\n".join(sel)


def normalisations() -> str:
    lines = ["| task | metric | grad_norm rho | score_w rho | score_z rho |", "|---|---|---|---|---|"]
    for task, key, label, _ in SERIES:
        record = json.loads((RESULTS / f"beyond_{task}.json").read_text())
        summary = record["summary"][key] if key else record["summary"]
        rho = [summary[c]["correlation"]["spearman"] for c in ("grad_norm", "score_w", "score_z")]
        lines.append(f"| {task} | {label} | " + " | ".join(f"{r:+.3f}" for r in rho) + " |")
    return "\n".join(lines)


def probe_loss() -> str:
    """The probe batch's own loss (same forward pass, training data) as a selector, for comparison."""
    from valfree.selection import correlations, gap_to_oracle, select_checkpoint

    lines = ["| task | metric | Spearman rho of probe loss | tail argmin of probe loss (gap) |", "|---|---|---|---|"]
    for task, key, label, column in SERIES:
        record = json.loads((RESULTS / f"beyond_{task}.json").read_text())
        rows = record["rows"]
        steps, loss, metric = [r["step"] for r in rows], [r["probe_loss"] for r in rows], [r[column] for r in rows]
        sel = select_checkpoint(steps, loss, tail=0.2, ema=3, mode="min")
        gap = gap_to_oracle(sel.index, metric, record["higher_is_better"])
        lines.append(f"| {task} | {label} | {correlations(loss, metric).spearman:+.3f} | "
                     f"{fmt(metric[sel.index])} @ {sel.step:.0f} ({fmt(gap, 3)}) |")
    return "\n".join(lines)


def diffusion_probe_batch() -> str:
    path = RESULTS / "beyond_diffusion_probe_batch.json"
    if not path.exists():
        return ""
    record = json.loads(path.read_text())
    lines = ["| probe batch | noise seed | Spearman rho vs held-out MSE | vs classifier FID | tail argmin gap (MSE) | (FID) |",
             "|---|---|---|---|---|---|"]
    for e in record["results"]:
        m, f = e["heldout_mse"], e["classifier_fid"]
        lines.append(f"| {e['probe_batch']} | {e['seed']} | {m['spearman']:+.3f} | {f['spearman']:+.3f} | "
                     f"{fmt(m['tail_argmin_gap'], 3)} | {fmt(f['tail_argmin_gap'], 3)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    for name in PLOTS:
        if (RESULTS / f"beyond_{name}.json").exists():
            plot_from_json(name)
    print(tables())
    print()
    print(normalisations())
    print()
    print(probe_loss())
    print()
    print(diffusion_probe_batch())
