"""``valfree report``: a self-contained HTML page (PNG plots inlined) explaining a checkpoint choice.

Held-out metrics, when given, are read for display only: the choice is made from the scores alone,
then compared with the metric through correlations and the gap to the oracle.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from pathlib import Path

import numpy as np

from ..errors import ValfreeError
from ..selection.label_wave import trailing_mean
from ..selection.rules import DEFAULT_RULE, LA_COLUMN, PC_COLUMN
from .arguments import add_out, add_quiet
from .preflight import check_metrics_file, check_output_file, check_scores_source
from .select import _column, add_selection_arguments, choose, explain, noise_diagnostic

# Metrics where lower is better; any other metric column is taken as higher-is-better (accuracy, mIoU, AP).
LOWER_IS_BETTER_METRICS = ("loss", "error", "nll", "mse", "fid", "perplexity", "ppl")


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write a self-contained HTML report with plots",
                       description="Write a self-contained HTML page explaining a checkpoint choice; held-out "
                                   "metrics, when given, are shown next to it and never used to choose.")
    p.add_argument("scores", help="CSV written by 'valfree score' (or a Hugging Face output folder)")
    p.add_argument("--metrics", default=None,
                   help="CSV of held-out metrics, for display only (path or step, then metric columns)")
    p.add_argument("--metric", default=None, help="which metric column to use (default: the first)")
    add_selection_arguments(p)
    add_out(p, "report.html", "the HTML file to write", aliases=("--output",))
    add_quiet(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_scores_source(args.scores)
    if args.metrics is not None:
        check_metrics_file(args.metrics, args.metric)
    check_output_file(args.out, "--out", "report.html")
    path = write_report(args.scores, args.out, metrics=args.metrics, metric=args.metric, column=args.column,
                        tail=args.tail, ema=args.ema, mode=args.mode, rule=args.rule, patience=args.patience,
                        start=args.start)
    print(f"wrote {path}")
    return 0


def metric_higher_is_better(name: str) -> bool:
    return not any(word in name.lower() for word in LOWER_IS_BETTER_METRICS)


def read_metrics(path: str | os.PathLike, rows: list[dict], steps: np.ndarray, metric: str | None) -> tuple[str, np.ndarray]:
    """Align a held-out metrics CSV (keyed by ``path`` or ``step``) with the score rows."""
    p = Path(path)
    if not p.exists():
        raise ValfreeError(f"the metrics file {p} does not exist.")
    with open(p, newline="") as fh:
        table = list(csv.DictReader(fh))
    if not table:
        raise ValfreeError(f"the metrics file {p} has no rows.")
    columns = [c for c in table[0] if c not in ("path", "step")]
    if metric is None:
        if not columns:
            raise ValfreeError(f"{p} has no metric column besides path and step.")
        metric = columns[0]
    elif metric not in columns:
        raise ValfreeError(f"{p} has no column {metric!r}; available: {', '.join(columns)}.")
    by_path = {Path(r["path"]).name: r for r in table if r.get("path")}
    by_step = {float(r["step"]): r for r in table if r.get("step") not in (None, "")}
    values = []
    for row, step in zip(rows, steps):
        hit = by_path.get(Path(row.get("path", "")).name) or by_step.get(float(step))
        values.append(float(hit[metric]) if hit and hit.get(metric) not in (None, "") else math.nan)
    values = np.array(values)
    if np.isnan(values).all():
        raise ValfreeError(f"no row of {p} matches a scored checkpoint by path name or step.")
    return metric, values


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _marks(ax, steps, choice, best: int | None) -> None:
    """Vertical lines at the rule's choice, the probe's own choice when it differs, and the best
    checkpoint on the held-out metric."""
    ax.axvline(choice.step, color="C3", lw=1.5, label=f"chosen ({choice.rule}): step {choice.step:g}")
    if choice.probe is not None and choice.probe.step != choice.step:
        ax.axvline(choice.probe.step, color="C0", ls="--", lw=1.2, label=f"the probe alone: step {choice.probe.step:g}")
    if best is not None:
        ax.axvline(steps[best], color="C2", ls="-.", lw=1.2, label=f"best on the held-out metric: step {steps[best]:g}")


def plot_series(steps, scores, sel, column, metric_name=None, metric=None, choice=None, best=None):
    """Raw and smoothed score over steps, the tail window shaded, the choices marked; metric on a twin axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(steps, kind="stable")
    s, x, sm = steps[order], scores[order], sel.smoothed[order]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(s, x, "o", ms=3, color="0.55", label=f"{column} (raw)")
    ax.plot(s, sm, "-", color="C0", lw=2, label=f"EMA span {sel.ema:g}")
    start, stop = sel.window
    ax.axvspan(s[start], s[stop - 1], color="C0", alpha=0.08, label=f"tail window ({stop - start} points)")
    ax.plot([sel.step], [sel.score], "*", ms=16, color="C0", label=f"probe's choice: step {sel.step:g}")
    if choice is not None:
        _marks(ax, steps, choice, best)
    bad = ~np.isfinite(x)
    for i, b in enumerate(s[bad]):
        ax.axvline(b, color="C3", ls=":", lw=1, label="failed or non-finite checkpoint" if i == 0 else None)
    ax.set_xlabel("step")
    ax.set_ylabel(column)
    handles, labels = ax.get_legend_handles_labels()
    if metric is not None:
        ax2 = ax.twinx()
        m = metric[order]
        ax2.plot(s, m, "-s", ms=3, color="C2", alpha=0.8, label=f"{metric_name} (held out, display only)")
        ax2.set_ylabel(metric_name)
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
    ax.set_title(f"{column}: selection without labels")
    return _png(fig)


def plot_predictions(steps, pred_change, agreement, choice, best=None):
    """Prediction changes (raw and the rule's moving average) and label agreement over steps, with the
    Label Wave point, the guard's verdict and the choices marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = np.argsort(steps, kind="stable")
    s, pc = steps[order], pred_change[order]
    fig, ax = plt.subplots(figsize=(8, 3.4))
    ax.plot(s, pc, "o", ms=3, color="0.55", label="prediction changes (raw)")
    window = choice.wave.smoothed if choice.wave is not None else trailing_mean(pc, 3)
    ax.plot(s, window, "-", color="C1", lw=2, label="moving average")
    if choice.wave is not None:
        verdict = {True: "guard fired", False: "guard quiet", None: ""}[choice.guard_fired]
        ax.plot([choice.wave_step], [choice.wave.minimum], "v", ms=11, color="C1",
                label=f"Label Wave point: step {choice.wave_step:g}" + (f" ({verdict})" if verdict else ""))
    _marks(ax, steps, choice, best)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of the subset that changed class")
    handles, labels = ax.get_legend_handles_labels()
    if agreement is not None and np.isfinite(agreement).any():
        ax2 = ax.twinx()
        ax2.plot(s, agreement[order], "-", color="C4", lw=1.5, label="label agreement (given labels)")
        ax2.set_ylabel("label agreement")
        h2, l2 = ax2.get_legend_handles_labels()
        handles, labels = handles + h2, labels + l2
    ax.legend(handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    ax.set_title("prediction changes on the training subset: memorisation shows as a rise after the minimum")
    return _png(fig)


def gap_words(gap: float, values: np.ndarray, metric: str) -> str:
    """The gap to the oracle in the metric's units; a metric on [0, 1] (accuracy, mIoU) in points."""
    finite = values[np.isfinite(values)]
    if finite.size and finite.min() >= 0 and finite.max() <= 1:
        return f"{100 * gap:.2f} points of {metric}"
    return f"{gap:.4g} ({metric})"


def tail_words(sel) -> str:
    start, stop = sel.window
    size = stop - start
    if isinstance(sel.tail, float):
        return f"the last {100 * sel.tail:g} % of the run ({size} of the checkpoints)"
    return f"the last {size} checkpoints"


def plot_scatter(steps, scores, metric, column, metric_name, corr):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    ok = np.isfinite(scores) & np.isfinite(metric)
    points = ax.scatter(scores[ok], metric[ok], s=14, c=steps[ok], cmap="viridis")
    fig.colorbar(points, ax=ax, label="step")
    ax.set_xlabel(column)
    ax.set_ylabel(metric_name)
    ax.set_title(f"Pearson {corr.pearson:+.3f}, Spearman {corr.spearman:+.3f} (n={corr.n})", fontsize=10)
    return _png(fig)


def write_report(scores_csv, output="report.html", metrics=None, metric=None, column="grad_norm", tail="0.2",
                 ema: float = 3, mode: str | None = None, title: str = "valfree report", rule: str = DEFAULT_RULE,
                 patience="0.2", start="2") -> Path:
    """Write the HTML report and return its path."""
    from ..selection import correlations, gap_to_oracle

    rows, steps, scores, choice = choose(scores_csv, column, tail, ema, mode, rule, patience, start)
    sel = choice.probe if choice.probe is not None else choose(scores_csv, column, tail, ema, mode, "probe")[3].probe
    metric_values = corr = gap = best = None
    if metrics is not None:
        metric, metric_values = read_metrics(metrics, rows, steps, metric)
        corr = correlations(scores, metric_values)
        higher = metric_higher_is_better(metric)
        gap = gap_to_oracle(choice.index, metric_values, higher_is_better=higher)
        best = int(np.nanargmax(metric_values) if higher else np.nanargmin(metric_values))
    chosen = rows[choice.index]
    _, warning = noise_diagnostic(rows, steps)
    why = "".join(f"<li>{html.escape(line)}</li>" for line in explain(choice, steps, warning))
    parts = [
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Scores: <code>{html.escape(str(scores_csv))}</code> ({len(rows)} checkpoints). "
        f"Rule <b>{html.escape(choice.rule)}</b>; its probe part smooths <b>{html.escape(column)}</b> with an EMA of span "
        f"{sel.ema:g} and takes the {'minimum' if sel.mode == 'min' else 'maximum'} over {tail_words(sel)}. "
        "No held-out label is used to choose.</p>",
        f"<p class=choice>Chosen: step <b>{choice.step:g}</b> &mdash; <code>{html.escape(str(chosen.get('path', '')))}</code></p>",
        f"<ul>{why}</ul>",
        f'<img alt="score series" src="data:image/png;base64,'
        f'{plot_series(steps, scores, sel, column, metric, metric_values, choice, best)}">',
    ]
    pc, la = _column(rows, PC_COLUMN), _column(rows, LA_COLUMN)
    if pc is not None and np.isfinite(pc).any():
        parts.append(f'<img alt="prediction changes" src="data:image/png;base64,{plot_predictions(steps, pc, la, choice, best)}">')
    if metric_values is not None:
        order = np.argsort(steps, kind="stable")
        oracle = best
        last = int(order[-1])
        parts += [
            "<h2>Against the held-out metric (evaluation only)</h2>",
            f'<img alt="score against metric" src="data:image/png;base64,{plot_scatter(steps, scores, metric_values, column, metric, corr)}">',
            "<table><tr><th></th><th>step</th><th>" + html.escape(metric) + "</th></tr>"
            f"<tr><td>chosen</td><td>{steps[choice.index]:g}</td><td>{metric_values[choice.index]:.4g}</td></tr>"
            f"<tr><td>oracle (best {html.escape(metric)})</td><td>{steps[oracle]:g}</td><td>{metric_values[oracle]:.4g}</td></tr>"
            f"<tr><td>last checkpoint</td><td>{steps[last]:g}</td><td>{metric_values[last]:.4g}</td></tr></table>",
            f"<p>Gap to the oracle: <b>{html.escape(gap_words(gap, metric_values, metric))}</b>. Correlations of {html.escape(column)} with {html.escape(metric)}: "
            f"Pearson {corr.pearson:+.3f} (p={corr.pearson_p:.2g}), Spearman {corr.spearman:+.3f} (p={corr.spearman_p:.2g}), "
            f"Kendall {corr.kendall:+.3f} (p={corr.kendall_p:.2g}), n={corr.n}.</p>",
        ]
    failed = [r for r in rows if r.get("status") == "failed"]
    if failed:
        parts.append("<h2>Failed checkpoints</h2><ul>" + "".join(
            f"<li><code>{html.escape(str(r.get('path')))}</code>: {html.escape(str(r.get('error')))}</li>" for r in failed
        ) + "</ul>")
    warned = [r for r in rows if r.get("warnings")]
    if warned:
        parts.append(f"<p>Warnings on {len(warned)} rows, e.g.: {html.escape(str(warned[0]['warnings']))}</p>")
    style = ("body{font-family:sans-serif;max-width:900px;margin:2em auto;color:#222}img{max-width:100%}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px}.choice{font-size:1.1em}")
    page = f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title><style>{style}</style></head><body>{''.join(parts)}</body></html>"
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8", errors="backslashreplace")  # a non-UTF-8 file name shows escaped
    return out
