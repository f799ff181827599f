"""``valfree select``: a choice from a results CSV (or a Hugging Face run folder), printed for people and scripts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import ValfreeError
from .arguments import MODES, add_quiet, ema_span, tail as tail_type
from .preflight import check_scores_source

if TYPE_CHECKING:  # valfree.io and valfree.selection load torch and scipy; they load when a command runs
    from ..selection import Selection

# Signals where larger means better; every other column is minimised.
HIGHER_IS_BETTER = {"confidence", "margin"}


def add_selection_arguments(p) -> None:
    """The selection rule's options, shared by ``select`` and ``report``."""
    p.add_argument("--column", default="grad_norm", help="score column (grad_norm, score_w, score_z, entropy, ...)")
    p.add_argument("--tail", type=tail_type, default="0.2",
                   help="the window the choice is made in: a fraction of the trajectory (0.2) or a count of points (10)")
    p.add_argument("--ema", type=ema_span, default=3, help="EMA span; 1 disables smoothing")
    p.add_argument("--mode", default=None, choices=MODES,
                   help="min or max of the smoothed score (default: the column's natural direction)")


def add_parser(sub) -> None:
    p = sub.add_parser("select", help="choose a checkpoint from a scores CSV; prints its path last",
                       description="Choose a checkpoint from a results CSV (or a Hugging Face output folder) without "
                                   "labels; the chosen checkpoint's path is the last line printed.")
    p.add_argument("scores", help="CSV written by 'valfree score' (or a Hugging Face output folder)")
    add_selection_arguments(p)
    p.add_argument("--json", action="store_true", help="print the choice as JSON instead of a table")
    add_quiet(p, help="print only the chosen checkpoint's path (with --json, the JSON only)")
    p.set_defaults(func=run)


def run(args) -> int:
    check_scores_source(args.scores)
    if args.quiet and not args.json:
        # Only the chosen path, for scripts: the table goes to a stream nobody reads.
        import io

        result = select_from_file(args.scores, column=args.column, tail=args.tail, ema=args.ema, mode=args.mode,
                                  stream=io.StringIO())
        print(result["path"])
        return 0
    select_from_file(args.scores, column=args.column, tail=args.tail, ema=args.ema, mode=args.mode, as_json=args.json)
    return 0


def json_value(value):
    """A value as JSON shows it: a float that holds a whole number (a step, a count) as an integer, and
    NaN or inf as null, which JSON has no number for."""
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        value = value.item()
    if isinstance(value, float):
        if not math.isfinite(value):
            return None
    return value


# Fields whose values are whole numbers, though a float array may carry them (steps come from a CSV).
INTEGER_FIELDS = ("step", "index", "window", "invalid")


def json_result(result: dict) -> dict:
    """``select --json``'s object: steps, indices and windows as integers, NaN as null."""
    out = json_value(result)
    for key in INTEGER_FIELDS:
        value = out.get(key)
        if isinstance(value, float) and value.is_integer():
            out[key] = int(value)
        elif isinstance(value, list):
            out[key] = [int(v) if isinstance(v, float) and v.is_integer() else v for v in value]
    return out


def natural_mode(column: str) -> str:
    return "max" if column in HIGHER_IS_BETTER else "min"


def parse_tail(text: str | float | int) -> float | int:
    """'0.2' -> fraction 0.2; '10' -> count 10."""
    if isinstance(text, (int, float)):
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValfreeError(f"--tail must be a fraction like 0.2 or a count like 10, not {text!r}.") from None
    if value >= 1 and value.is_integer() and "." not in str(text):
        return int(value)
    return value


def _float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan


def load_series(source: str, column: str) -> tuple[list[dict], np.ndarray, np.ndarray]:
    """Rows, steps and scores of ``column``; failed rows get a NaN score so they show up as invalid."""
    from ..io.hf_state import rows_from_trainer_state
    from ..io.results import STATUS_OK, read_scores

    p = Path(source)
    if p.is_dir():
        rows = rows_from_trainer_state(p)
    else:
        rows = read_scores(p)
    if column not in rows[0] and not any(column in r for r in rows):
        available = [c for c in rows[0] if c not in ("path", "status", "error", "step_source", "warnings", "path_used")]
        raise ValfreeError(f"{source} has no column {column!r}; available: {', '.join(available)}.")
    steps = np.array([_float(r.get("step")) for r in rows])
    scores = np.array([_float(r.get(column)) if r.get("status", STATUS_OK) == STATUS_OK else math.nan for r in rows])
    if np.isnan(steps).any():
        steps = np.arange(len(rows), dtype=float)
    return rows, steps, scores


def choose(source: str, column: str = "grad_norm", tail="0.2", ema: float = 3, mode: str | None = None):
    from ..selection import select_checkpoint

    rows, steps, scores = load_series(source, column)
    if mode is None:
        # A preset records the direction measured for its task (e.g. diffusion); it applies to the probe columns.
        modes = {r.get("mode") for r in rows if r.get("mode")}
        preset_mode = modes.pop() if len(modes) == 1 and column in ("grad_norm", "score_w", "score_z") else None
        mode = preset_mode or natural_mode(column)
    selection = select_checkpoint(steps, scores, tail=parse_tail(tail), ema=ema, mode=mode)
    return rows, steps, scores, selection


def selection_table(rows: list[dict], steps: np.ndarray, scores: np.ndarray, sel: Selection, column: str) -> str:
    order = np.argsort(steps, kind="stable")
    start, stop = sel.window
    window_idx = set(int(i) for i in order[start:stop])
    lines = [
        f"{len(rows)} checkpoints, {len(sel.invalid)} without a finite {column}; "
        f"window: last {stop - start} (tail={sel.tail}), EMA span {sel.ema}, {sel.mode} of smoothed {column}",
        f"{'step':>10}  {column:>12}  {'smoothed':>12}",
    ]
    shown = [int(i) for i in order[max(0, start - 2):stop]]
    for i in shown:
        mark = " <- chosen" if i == sel.index else ("" if i in window_idx else "   (before window)")
        lines.append(f"{steps[i]:>10.0f}  {scores[i]:>12.6g}  {sel.smoothed[i]:>12.6g}{mark}")
    return "\n".join(lines)


def select_from_file(source: str, column: str = "grad_norm", tail="0.2", ema: float = 3, mode: str | None = None,
                     as_json: bool = False, stream=None) -> dict:
    """Print the choice (a table then the path, or JSON) and return it as a dict."""
    import sys

    stream = stream or sys.stdout
    rows, steps, scores, sel = choose(source, column, tail, ema, mode)
    chosen = rows[sel.index]
    # Monitor rows without a saved file have no path; the step identifies them instead.
    result = {"path": chosen.get("path") or f"step={sel.step:g}", "column": column, **sel.as_dict()}
    if as_json:
        print(json.dumps(json_result(result), indent=2), file=stream)
    else:
        print(selection_table(rows, steps, scores, sel, column), file=stream)
        print(result["path"], file=stream)
    return result
