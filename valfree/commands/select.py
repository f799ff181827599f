"""``valfree select``: a choice from a results CSV (or a Hugging Face run folder), printed for people and scripts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import ValfreeError
# The rules are numpy only (valfree.selection loads scipy lazily); valfree.io loads torch, so it is
# imported when a command runs, not when the CLI builds its parsers.
from ..selection.label_wave import LABEL_WAVE_DEFAULTS
from ..selection.rules import (
    DEFAULT_RULE,
    LA_COLUMN,
    PC_COLUMN,
    RULES,
    SUBSET_COLUMN,
    RuleChoice,
    memorisation_warning,
    memorised_fraction,
    stable_rejections,
    select_by_rule,
)
from ..selection.select import Selection
from .arguments import MODES, add_quiet, ema_span, tail as tail_type
from .preflight import check_scores_source

STATUS_OK = "ok"  # valfree.io.results.STATUS_OK, without importing torch to read it

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
    p.add_argument("--rule", default=DEFAULT_RULE, choices=list(RULES),
                   help=f"selection rule (default {DEFAULT_RULE!r}: the probe, unless prediction changes show the model "
                        "memorising labels it had rejected; 'probe': the probe alone; 'label-wave': the first minimum of "
                        "prediction changes, reads no label)")
    p.add_argument("--patience", default=str(LABEL_WAVE_DEFAULTS["patience"]),
                   help="Label Wave patience: a fraction of the run (0.2) or a count of checkpoints (5)")
    p.add_argument("--start", default=str(LABEL_WAVE_DEFAULTS["start"]),
                   help="first checkpoint the Label Wave minimum may be: a count (2) or a fraction of the run (0.1)")


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
    options = dict(column=args.column, tail=args.tail, ema=args.ema, mode=args.mode, rule=args.rule,
                   patience=args.patience, start=args.start)
    if args.quiet and not args.json:
        # Only the chosen path, for scripts: the table goes to a stream nobody reads.
        import io

        result = select_from_file(args.scores, stream=io.StringIO(), **options)
        print(result["path"])
        return 0
    select_from_file(args.scores, as_json=args.json, **options)
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


def parse_tail(text: str | float | int, flag: str = "--tail") -> float | int:
    """'0.2' -> fraction 0.2; '10' -> count 10."""
    if isinstance(text, (int, float)):
        return text
    try:
        value = float(text)
    except ValueError:
        raise ValfreeError(f"{flag} must be a fraction like 0.2 or a count like 10, not {text!r}.") from None
    if not math.isfinite(value) or value <= 0:
        raise ValfreeError(f"{flag} must be a positive fraction like 0.2 or a count like 10, not {text!r}.")
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


def choose(source: str, column: str = "grad_norm", tail="0.2", ema: float = 3, mode: str | None = None,
           rule: str = DEFAULT_RULE, patience="0.2", start="2"):
    """Rows, steps, scores of ``column``, and the rule's :class:`RuleChoice` (its ``probe`` is the
    probe part's :class:`Selection`)."""
    rows, steps, scores = load_series(source, column)
    if mode is None:
        # A preset records the direction measured for its task (e.g. diffusion); it applies to the probe columns.
        modes = {r.get("mode") for r in rows if r.get("mode")}
        preset_mode = modes.pop() if len(modes) == 1 and column in ("grad_norm", "score_w", "score_z") else None
        mode = preset_mode or natural_mode(column)
    columns = {column: scores, **{name: _column(rows, name) for name in (PC_COLUMN, LA_COLUMN, SUBSET_COLUMN)}}
    choice = select_by_rule(rule, steps, columns, tail=parse_tail(tail), ema=ema, column=column, mode=mode,
                            patience=parse_tail(patience, "--patience"), start=parse_tail(start, "--start"))
    return rows, steps, scores, choice


def _column(rows: list[dict], name: str) -> np.ndarray | None:
    if not any(r.get(name) not in (None, "") for r in rows):
        return None
    return np.array([_float(r.get(name)) if r.get("status", STATUS_OK) == STATUS_OK else math.nan for r in rows])


def selection_table(rows: list[dict], steps: np.ndarray, scores: np.ndarray, sel: Selection, column: str,
                    chosen: int | None = None, pred_change: np.ndarray | None = None) -> str:
    """The probe's window (and the rule's choice, when it lies elsewhere), one line per checkpoint."""
    chosen = sel.index if chosen is None else chosen
    order = np.argsort(steps, kind="stable")
    start, stop = sel.window
    window_idx = set(int(i) for i in order[start:stop])
    pc_head = f"  {'pred_change':>11}" if pred_change is not None else ""
    lines = [
        f"{len(rows)} checkpoints, {len(sel.invalid)} without a finite {column}; "
        f"window: last {stop - start} (tail={sel.tail}), EMA span {sel.ema}, {sel.mode} of smoothed {column}",
        f"{'step':>10}  {column:>12}  {'smoothed':>12}{pc_head}",
    ]
    shown = [int(i) for i in order[max(0, start - 2):stop]]
    if chosen not in shown:
        shown = sorted(set(shown) | {chosen}, key=lambda i: steps[i])
    for i in shown:
        if i == chosen:
            mark = " <- chosen"
        elif i == sel.index:
            mark = " <- the probe alone"
        else:
            mark = "" if i in window_idx else "   (before window)"
        pc = f"  {pred_change[i]:>11.4f}" if pred_change is not None else ""
        lines.append(f"{steps[i]:>10.0f}  {scores[i]:>12.6g}  {sel.smoothed[i]:>12.6g}{pc}{mark}")
    return "\n".join(lines)


def explain(choice: RuleChoice, steps: np.ndarray, warning: str | None) -> list[str]:
    """Why the rule chose what it chose, in a few plain lines."""
    lines = [f"rule {choice.rule}: {choice.reason}."]
    for note in choice.notes:
        lines.append(f"note: {note}.")
    if choice.wave is not None:
        confirmed = "confirmed" if choice.wave.stopped_at is not None else "not confirmed before the run ended"
        lines.append(f"prediction changes: smoothed minimum {choice.wave.minimum:.4f} at step {choice.wave_step:g} ({confirmed}).")
    if choice.probe is not None and choice.probe.step != choice.step:
        lines.append(f"the probe alone would have taken step {choice.probe.step:g}.")
    if warning:
        lines.append(f"warning: {warning}")
    return lines


def noise_diagnostic(rows: list[dict], steps: np.ndarray) -> tuple[dict | None, str | None]:
    """The memorised share of the training labels (an estimate of the label-noise rate from below) and
    its warning, when the run has prediction changes and label agreement."""
    columns = {name: _column(rows, name) for name in (PC_COLUMN, LA_COLUMN, SUBSET_COLUMN)}
    if columns[PC_COLUMN] is None or columns[LA_COLUMN] is None:
        return None, None
    try:
        found = memorised_fraction(steps, columns)
    except ValfreeError:
        return None, None
    if found is None:
        return None, None
    estimate, wave_step = found
    settled = stable_rejections(steps, columns)
    return {**estimate.as_dict(), "wave_step": wave_step}, memorisation_warning(estimate, wave_step, settled=settled)


def select_from_file(source: str, column: str = "grad_norm", tail="0.2", ema: float = 3, mode: str | None = None,
                     as_json: bool = False, stream=None, rule: str = DEFAULT_RULE, patience="0.2", start="2") -> dict:
    """Print the choice (a table, why, then the path; or JSON) and return it as a dict."""
    import sys

    stream = stream or sys.stdout
    rows, steps, scores, choice = choose(source, column, tail, ema, mode, rule, patience, start)
    chosen = rows[choice.index]
    memorised, warning = noise_diagnostic(rows, steps)
    # Monitor rows without a saved file have no path; the step identifies them instead.
    result = {"path": chosen.get("path") or f"step={choice.step:g}", "column": column, **choice.as_dict()}
    if choice.probe is not None:
        result.update({k: v for k, v in choice.probe.as_dict().items() if k not in ("index", "step")})
        result["probe_index"] = choice.probe.index
    result["memorised"] = memorised
    result["warning"] = warning
    if as_json:
        print(json.dumps(json_result(result), indent=2), file=stream)
    else:
        if choice.probe is not None:
            print(selection_table(rows, steps, scores, choice.probe, column, choice.index, _column(rows, PC_COLUMN)), file=stream)
        for line in explain(choice, steps, warning):
            print(line, file=stream)
        print(result["path"], file=stream)
    return result
