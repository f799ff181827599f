"""PNG plots for the report, drawn from the results JSON only."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _norm(x):
    x = np.asarray(x, dtype=float)
    lo, hi = np.nanmin(x), np.nanmax(x)
    return (x - lo) / (hi - lo) if hi > lo else x * 0


def trajectories(results: dict, path: Path, seed: int = 0) -> Path | None:
    """Test accuracy with the min-max scaled head gradient and Tr(H_eff), one panel per family x regime."""
    curves = results["curves"]
    fams = list(results["sizes"]["families"])
    regs = list(results["sizes"]["regimes"])
    names = {(c.split("-")[0], c.split("-")[1]): c for c in curves if c.endswith(f"-s{seed}")}
    if not names:
        return None
    fig, axes = plt.subplots(len(fams), len(regs), figsize=(4 * len(regs), 2.6 * len(fams)), squeeze=False)
    for i, fam in enumerate(fams):
        for j, reg in enumerate(regs):
            ax = axes[i][j]
            name = names.get((fam, reg))
            if name is None:
                ax.set_axis_off()
                continue
            c = curves[name]
            ep = c["epoch"]
            ax.plot(ep, 100 * np.asarray(c["test_acc"]), color="k", lw=1.8, label="test acc (%)")
            ax.set_title(f"{fam} / {reg}", fontsize=9)
            ax2 = ax.twinx()
            ax2.plot(ep, _norm(c["hg_grad_norm"]), color="tab:blue", lw=1, label="head gradient (scaled)")
            if np.isfinite(c["tpv_trace"]).all():
                ax2.plot(ep, _norm(c["tpv_trace"]), color="tab:red", lw=1, label="Tr(H_eff) (scaled)")
            chosen = results["per_run"][name]["chosen"]
            for sel, color in (("hg_raw", "tab:blue"), ("oracle", "k"), ("val500", "tab:green")):
                if sel in chosen:
                    ax.axvline(ep[chosen[sel]["index"]], color=color, ls=":", lw=1)
            ax2.set_yticks([])
            ax.tick_params(labelsize=7)
            if i == 0 and j == 0:
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = ax2.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=6, loc="lower right")
    fig.suptitle(f"Seed {seed}: test accuracy (black), probe (blue), Tr(H_eff) (red); dotted: probe choice, oracle, 500-image validation", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def gaps(results: dict, path: Path, selectors: list[str]) -> Path:
    """Mean gap to the oracle per selector, one bar group per regime, std over runs as error bars."""
    cells = results["summary"]["cells"]
    regs = list(results["sizes"]["regimes"])
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(selectors) * len(regs) / 2), 4))
    width = 0.8 / len(regs)
    x = np.arange(len(selectors))
    for k, reg in enumerate(regs):
        m = [cells.get(f"{s}|all|{reg}", {}).get("gap_mean", np.nan) for s in selectors]
        sd = [cells.get(f"{s}|all|{reg}", {}).get("gap_std", np.nan) for s in selectors]
        ax.bar(x + k * width, m, width, yerr=sd, label=reg, capsize=2)
    ax.set_xticks(x + width * (len(regs) - 1) / 2)
    ax.set_xticklabels(selectors, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("gap to oracle (test-accuracy points)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def tpv_sweep(sweep: dict, path: Path) -> Path:
    """Test loss against train Tr(H_eff), one colour per knob, the knob's value annotated."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for knob, ax in zip(("weight_decay", "label_smoothing"), axes):
        pts = [p for p in sweep["points"] if p["knob"] == knob]
        values = sorted({p["value"] for p in pts})
        mean = lambda v, k: float(np.mean([p[k] for p in pts if p["value"] == v]))  # noqa: E731
        xs = [mean(v, "train_tpv") for v in values]
        ys = [mean(v, "test_loss") for v in values]
        ax.scatter([p["train_tpv"] for p in pts], [p["test_loss"] for p in pts], s=10, alpha=0.4)
        ax.plot(xs, ys, "-o", ms=4)
        for v, x, y in zip(values, xs, ys):
            ax.annotate(f"{v:g}", (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("Tr(H_eff) on training inputs (isotropic TPV, logits)")
        ax.set_ylabel("test loss")
        ax.set_title(knob.replace("_", " "))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def train_vs_test(points: list[tuple[float, float, str]], path: Path, title: str) -> Path:
    """Train TPV against test TPV, y = x for reference."""
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    labels = sorted({p[2] for p in points})
    for lab in labels:
        xs = [p[0] for p in points if p[2] == lab]
        ys = [p[1] for p in points if p[2] == lab]
        ax.scatter(xs, ys, s=14, label=lab)
    lo = min(min(p[0], p[1]) for p in points)
    hi = max(max(p[0], p[1]) for p in points)
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("TPV on training inputs")
    ax.set_ylabel("TPV on test inputs")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def prediction_changes(results: dict, names: list[str], path: Path) -> Path | None:
    """Per run: PC (left axis), label agreement and test accuracy (right axis) against the step, with
    the probe's, every rule's and the oracle's choice marked (and whether each rule's guard fired)."""
    mem = results.get("memorisation") or {}
    names = [n for n in names if n in results["curves"] and n in mem.get("details", {})]
    if not names:
        return None
    cols = 2
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.2 * cols, 2.9 * rows), squeeze=False)
    rule_colors = plt.get_cmap("tab10")
    for k, name in enumerate(names):
        ax = axes[k // cols][k % cols]
        c = results["curves"][name]
        x = np.asarray(c["epoch"], dtype=float)
        ax.plot(x, c["pred_change"], color="tab:purple", lw=1.6, label="prediction changes (PC)")
        ax.set_ylabel("PC", fontsize=7)
        ax2 = ax.twinx()
        ax2.plot(x, c["label_agreement"], color="tab:orange", lw=1.2, label="label agreement (given labels)")
        ax2.plot(x, c["test_acc"], color="k", lw=1.2, label="test accuracy")
        ax2.set_ylim(0, 1)
        chosen = results["per_run"][name]["chosen"]
        marks = [("probe", chosen["hg_raw"]["index"], "tab:blue", "--")] if "hg_raw" in chosen else []
        fired = []
        for i, (rule, d) in enumerate(mem["details"][name].items()):
            marks.append((rule, d["index"], rule_colors(2 + i), ":"))
            if d["guard_fired"]:
                fired.append(rule)
        marks.append(("oracle", chosen["oracle"]["index"], "k", "-"))
        for j, (label, idx, color, ls) in enumerate(marks):
            ax.axvline(x[idx] + 0.003 * j * (x[-1] - x[0]), color=color, ls=ls, lw=1.1, label=f"{label} choice")
        title = name + (f"  (guard fired: {', '.join(fired)})" if fired else "")
        ax.set_title(title, fontsize=8)
        ax.tick_params(labelsize=7)
        ax2.tick_params(labelsize=7)
        ax.set_xlabel("epoch", fontsize=7)
        if k == 0:
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, fontsize=5.5, loc="upper right")
    for k in range(len(names), rows * cols):
        axes[k // cols][k % cols].set_axis_off()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
