"""The one loop over checkpoints that every command measuring a folder shares.

``valfree score`` and ``valfree tpv`` (and any later per-checkpoint measurement) differ only in what
they measure. Everything else is here, once: checkpoints already in the results store (same path,
size and mtime) are skipped; each other checkpoint is measured by a callback that returns its result
columns; a checkpoint whose measurement raises becomes a failed row, with the error in one line, and
the others go on; every row is appended to the store as soon as it exists, so an interrupted run
keeps what it measured; a progress bar runs on stderr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..errors import NonFinite, ValfreeError
from ..io.checkpoints import CheckpointRef
from ..io.results import STATUS_FAILED, STATUS_NONFINITE, STATUS_OK, ResultsStore, checkpoint_key, identity_columns

# A measurement: the result columns of one checkpoint, or an exception that fails only that checkpoint.
Measure = Callable[[CheckpointRef], dict]


def failure_message(exc: BaseException) -> str:
    """One line for a failed checkpoint's row: a ValfreeError's own sentence, else the exception type
    and the first line of its message (cut at 300 characters, since a library's message can be a page)."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else ""
    if isinstance(exc, ValfreeError):
        return first or type(exc).__name__
    return f"{type(exc).__name__}: {first[:300]}" if first else type(exc).__name__


@dataclass
class RunSummary:
    """What a run over checkpoints did: counts, the output file, a note on ordering, the failures.

    ``verb`` names the measurement in the counts line ("scored", "measured").
    """

    out: str
    verb: str = "scored"
    scored: int = 0
    skipped: int = 0
    failed: int = 0
    note: str | None = None
    failures: list[tuple[str, str]] = field(default_factory=list)

    def counts(self) -> str:
        return f"{self.verb} {self.scored}, skipped {self.skipped} already in {self.out}, failed {self.failed}"

    def failure_lines(self) -> list[str]:
        return [f"  failed: {path}: {error}" for path, error in self.failures]

    def describe(self) -> str:
        lines = [f"note: {self.note}"] if self.note else []
        return "\n".join(lines + [self.counts()] + self.failure_lines())


class CheckpointLoop:
    """The checkpoints of one run that still need measuring, and the loop that measures them.

    Built before anything expensive (a model, a dataset) is set up, so that a run with nothing left to
    do can return at once: ``todo`` is empty then, and ``summary.skipped`` already counts the others.
    """

    def __init__(self, refs: Sequence[CheckpointRef], store: ResultsStore, summary: RunSummary):
        self.store, self.summary = store, summary
        done = store.done_keys()
        self.todo = [ref for ref in refs if checkpoint_key(ref.path) not in done]
        summary.skipped += len(refs) - len(self.todo)

    def run(self, measure: Measure, columns: Callable[[CheckpointRef], dict] | None = None,
            desc: str = "scoring", progress: bool = True) -> RunSummary:
        """Measure every checkpoint still to do and append its row.

        A row is the checkpoint's step, identity (path, size, mtime), then ``columns(ref)`` (settings
        that describe the run, written for failed rows too), then ``measure(ref)``, then status and error.
        """
        from tqdm.auto import tqdm

        summary = self.summary
        for ref in tqdm(self.todo, desc=desc, unit="ckpt", disable=not progress, file=sys.stderr):
            row = {"step": ref.step, **identity_columns(ref.path), **(columns(ref) if columns else {})}
            try:
                row.update(measure(ref))
                row.update(status=STATUS_OK, error="")
                summary.scored += 1
            except Exception as exc:  # one bad checkpoint must not stop the other ninety-nine
                status = STATUS_NONFINITE if isinstance(exc, NonFinite) else STATUS_FAILED
                row.update(status=status, error=failure_message(exc))
                summary.failed += 1
                summary.failures.append((row["path"], row["error"]))
            self.store.append(row)
        return summary
