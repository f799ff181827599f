"""Checks that run before a command's loop, so that a user's mistake is one sentence and exit code 2
rather than a failed row per checkpoint (exit code 1) or a traceback after an hour's work.

The rule: what would fail for every checkpoint alike (a device, an output path, a file that is not a
results CSV, a model that does not fit the data) is the user's and is refused here, with a
:class:`ValfreeError`; what fails for one checkpoint (a corrupt or mismatched file) stays a failed row.
torch is imported inside the functions that need it, so the command modules stay cheap to import.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from ..errors import ValfreeError

# How much of a text file is read to decide that it is not text (a binary file has NUL bytes early).
_SNIFF_BYTES = 1 << 16


def check_device(spec: str, flag: str = "--device") -> str:
    """Refuse a device torch cannot use here (unknown, ``meta``, CUDA on a CPU build or without a GPU,
    an index past the last GPU); return ``spec`` unchanged otherwise."""
    import torch

    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValfreeError(f"{flag} {spec!r} is not a torch device; use cpu, cuda, cuda:N or mps.") from None
    if device.type == "meta":
        raise ValfreeError(f"{flag} meta holds shapes but no values, so nothing can be measured on it; use cpu or cuda.")
    if device.type == "cpu":
        return spec
    if device.type == "cuda":
        if torch.version.cuda is None:
            raise ValfreeError(f"{flag} {spec} needs a CUDA build of torch, and this one ({torch.__version__}) "
                               "is CPU-only; use --device cpu or install a CUDA build.")
        if not torch.cuda.is_available():
            raise ValfreeError(f"{flag} {spec}: no CUDA GPU is visible (check the driver and CUDA_VISIBLE_DEVICES); "
                               "use --device cpu.")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValfreeError(f"{flag} {spec}: there {'is' if count == 1 else 'are'} only {count} CUDA "
                               f"device{'' if count == 1 else 's'} (cuda:0 to cuda:{count - 1}).")
        return spec
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValfreeError(f"{flag} {spec}: MPS is not available on this machine; use --device cpu.")
    try:
        torch.empty(1, device=device)
    except Exception as exc:  # any backend's refusal, in its own words
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValfreeError(f"{flag} {spec} cannot be used here ({first[:200]}); use --device cpu.") from None
    return spec


def _writable_ancestor(path: Path, flag: str, shown: str) -> None:
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ValfreeError(f"cannot write {flag} {shown}: {parent} is a file, not a folder.")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValfreeError(f"cannot write {flag} {shown}: the folder {parent} is not writable; choose another {flag}.")


def check_output_file(path: str | os.PathLike, flag: str = "--out", example: str = "results.csv") -> None:
    """Refuse an output file that is a folder or cannot be written, before any work is done."""
    p = Path(path)
    shown = repr(str(path))
    if p.is_dir():
        raise ValfreeError(f"{flag} {shown} is a folder; give a file name such as {str(p / example)!r}.")
    if p.exists():
        if not p.is_file():
            raise ValfreeError(f"{flag} {shown} is not a regular file; give a file name such as {example!r}.")
        if not os.access(p, os.W_OK):
            raise ValfreeError(f"cannot write {flag} {shown}: the file is read-only; choose another {flag}.")
        return
    _writable_ancestor(p, flag, shown)


def check_output_dir(path: str | os.PathLike, flag: str = "--out") -> None:
    """Refuse an output folder that is a file or cannot be created or written."""
    p = Path(path)
    shown = repr(str(path))
    if p.exists():
        if not p.is_dir():
            raise ValfreeError(f"{flag} {shown} is a file, but a folder is written there; give a folder name.")
        if not os.access(p, os.W_OK | os.X_OK):
            raise ValfreeError(f"cannot write into {flag} {shown}: the folder is not writable; choose another {flag}.")
        return
    _writable_ancestor(p, flag, shown)


def _read_text(path: Path, what: str) -> str:
    """A text file's contents; a missing file, a folder or a binary file is one sentence."""
    if not path.exists():
        raise ValfreeError(f"the {what} {str(path)!r} does not exist.")
    if not path.is_file():
        raise ValfreeError(f"the {what} {str(path)!r} is not a regular file.")
    with open(path, "rb") as fh:
        head = fh.read(_SNIFF_BYTES)
        rest = fh.read()
    if b"\0" in head or b"\0" in rest:
        raise ValfreeError(f"the {what} {str(path)!r} is a binary file, not CSV text.")
    # File names in results may not be UTF-8; they come back as they were written.
    return (head + rest).decode("utf-8", errors="surrogateescape")


def _csv_table(path: Path, what: str) -> tuple[list[str], list[dict]]:
    text = _read_text(path, what)
    try:
        reader = csv.DictReader(io.StringIO(text, newline=""))
        rows = list(reader)
        header = list(reader.fieldnames or [])
    except csv.Error as exc:
        raise ValfreeError(f"the {what} {str(path)!r} is not valid CSV ({exc}).") from None
    return header, rows


def check_scores_source(source: str | os.PathLike) -> None:
    """Refuse what ``valfree select`` and ``valfree report`` cannot read as scores: a file that is not a
    results CSV, or a run folder whose ``trainer_state.json`` is not the Trainer's."""
    p = Path(source)
    if p.is_dir():
        _check_trainer_state(p)
        return
    if not p.exists():
        return  # the reader says how to create it
    header, rows = _csv_table(p, "scores file")
    if not rows:
        return  # the reader says to score some checkpoints first
    if "step" not in header and "path" not in header:
        raise ValfreeError(
            f"{str(p)!r} is not a results CSV of 'valfree score' (its header has neither a step nor a path "
            f"column, only {', '.join(repr(c) for c in header[:6]) or 'nothing'})."
        )


def _check_trainer_state(folder: Path) -> None:
    states = sorted(folder.glob("trainer_state.json")) + sorted(folder.glob("checkpoint-*/trainer_state.json"))
    for state in states:
        text = _read_text(state, "trainer state")
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ValfreeError(f"cannot read {str(state)!r} as JSON ({exc}).") from None
        history = data.get("log_history") if isinstance(data, dict) else None
        if not isinstance(data, dict) or not isinstance(history, list) or not all(isinstance(e, dict) for e in history):
            raise ValfreeError(
                f"{str(state)!r} is not a Hugging Face trainer state: it needs an object whose log_history "
                "is a list of objects."
            )


def _is_number(text) -> bool:
    if text is None or str(text).strip() == "":
        return True  # a missing value is allowed: that checkpoint has no metric
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_metrics_file(path: str | os.PathLike, metric: str | None = None) -> None:
    """Refuse a held-out metrics file ``valfree report`` cannot use: binary, not CSV, no path or step
    column, or text where the metric (or the step) should be a number."""
    p = Path(path)
    header, rows = _csv_table(p, "metrics file")
    if not rows:
        return  # the reader says it has no rows
    if "path" not in header and "step" not in header:
        raise ValfreeError(f"the metrics file {str(p)!r} needs a path or a step column to match checkpoints; "
                           f"its columns are {', '.join(repr(c) for c in header[:6])}.")
    columns = [c for c in header if c not in ("path", "step")]
    name = metric if metric is not None else (columns[0] if columns else None)
    for column in ("step", name):
        if column is None or column not in header:
            continue  # the reader names the missing column
        for line, row in enumerate(rows, start=2):
            if not _is_number(row.get(column)):
                raise ValfreeError(f"the metrics file {str(p)!r} has {row.get(column)!r} in its {column!r} column "
                                   f"on line {line}, where a number is needed.")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0][:300]}" if text else type(exc).__name__


def check_model_on_batch(model, inputs, targets=None, *, loss: str = "ce", rows: int = 2) -> None:
    """Run ``model`` (as the factory built it, before any checkpoint is loaded) on the first ``rows``
    items of the probe batch, and refuse inputs it cannot take or class labels it has no output for.

    Call it once before the loop over checkpoints: a wrong input width or labels past the last class
    would otherwise fail every checkpoint the same way. The model is left as it was (eval mode and no
    gradient for the call, its mode restored after). ``inputs`` and ``targets`` must already be on the
    model's device.
    """
    import torch

    from ..probes.batches import forward, logits_of, take

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = forward(model, take(inputs, slice(0, rows)))
    except ValfreeError:
        raise
    except Exception as exc:  # the model's own complaint about its input, in one line
        raise ValfreeError(f"the model cannot take the --data inputs ({_first_line(exc)}); check that --model "
                           "and --data belong together.") from None
    finally:
        model.train(was_training)
    if loss != "ce" or not isinstance(targets, torch.Tensor) or targets.dim() != 1:
        return
    if targets.dtype in (torch.float16, torch.float32, torch.float64, torch.bfloat16) or targets.numel() == 0:
        return
    try:
        logits = logits_of(output)
    except Exception:
        return  # an output the probe itself will explain
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        return
    classes = int(logits.shape[-1])
    labelled = targets[targets >= 0]
    if labelled.numel() and int(labelled.max()) >= classes:
        raise ValfreeError(f"the --data labels go up to {int(labelled.max())}, but the model has {classes} outputs "
                           f"(classes 0 to {classes - 1}); check --model and --data, or score with --targets pseudo.")
    bad = targets[(targets < 0) & (targets != -100)]
    if bad.numel() and not (targets < 0).all():
        raise ValfreeError(f"the --data labels include {int(bad.min())}; class labels must be 0 or more "
                           "(-100 marks an ignored item).")



def draw_probe_batch(dataset, data_spec: str, size: int, seed: int):
    """:func:`valfree.io.data.probe_batch`, with a dataset whose items cannot be batched (strings, a
    dict indexed by position, mismatched shapes) refused in one sentence: the data is the user's, and
    it would fail every checkpoint alike."""
    from ..io.data import probe_batch

    try:
        return probe_batch(dataset, size, seed)
    except ValfreeError:
        raise
    except (TypeError, ValueError, KeyError, IndexError, RuntimeError, AttributeError) as exc:
        raise ValfreeError(f"the items of the data {data_spec!r} cannot be batched ({_first_line(exc)}); a dataset "
                           "should give (input tensor, label) pairs or dicts of tensors.") from None
