"""`valfree score` split across the ranks that torchrun starts, merged into the file one process writes.

Each rank scores every ``world``-th checkpoint not yet in the output, writes its rows to a part file,
and rank 0 folds the parts into the output in step order, which is the order in which one process
appends them. ``valfree score`` wraps its call of :func:`valfree.commands.score.score_checkpoints` in
:func:`torchrun_scoring`; outside torchrun that is a one-rank run writing the output directly.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from ..integrations.distributed import collective_device, rank_and_world
from ..io.results import ResultsStore, checkpoint_key


@dataclass
class ScoringRun:
    """One rank's part in scoring a folder of checkpoints; see :func:`torchrun_scoring`."""

    rank: int
    world: int
    out: Path
    device: str
    skipped: int = 0  # checkpoints already in ``out``, counted by :meth:`share`

    @property
    def part(self) -> Path:
        """Where this rank writes its rows: ``out`` itself for one process, else a per-rank part file."""
        return self.out if self.world == 1 else part_path(self.out, self.rank)

    def sum(self, value: int) -> int:
        """``value`` summed over the ranks (a count of scored or failed checkpoints), on every rank."""
        if self.world == 1:
            return int(value)
        t = torch.tensor([int(value)], dtype=torch.long, device=collective_device(self.device))
        dist.all_reduce(t)
        return int(t.item())

    def share(self, refs: list) -> list:
        """This rank's checkpoints: those not yet in ``out``, dealt round-robin in step order."""
        done = ResultsStore(self.out).done_keys() if self.out.exists() else set()
        todo = [ref for ref in refs if checkpoint_key(ref.path) not in done]
        self.skipped = len(refs) - len(todo)
        return todo[self.rank:: self.world]


def part_path(out: str | os.PathLike, rank: int) -> Path:
    out = Path(out)
    return out.with_name(f"{out.name}.rank{rank}.part")


def merge_parts(out: str | os.PathLike) -> int:
    """Fold every ``OUT.rankN.part`` file into ``out`` in step order, then delete the parts.

    Appending in step order is what a single process does, so the merged file is the same as the
    one a single process writes. Returns the number of rows merged. Safe to run on leftovers of an
    interrupted run: rows already in ``out`` with the same key are replaced, not duplicated.
    """
    out = Path(out)
    parts = sorted(out.parent.glob(f"{out.name}.rank*.part"))
    if not parts:
        return 0
    rows = [row for p in parts for row in ResultsStore(p).rows()]
    rows.sort(key=lambda r: (_as_float(r.get("step")), str(r.get("path", ""))))
    store = ResultsStore(out)
    for row in rows:
        store.append(row)
    for p in parts:
        ResultsStore.remove(p)
    return len(rows)


def _as_float(value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("inf")


def rank_device(device: str, local_rank: int) -> str:
    """One GPU per rank: 'cuda' becomes 'cuda:LOCAL_RANK'; explicit indices and CPU stay as they are."""
    return f"cuda:{local_rank}" if device == "cuda" else device


@contextlib.contextmanager
def torchrun_scoring(out: str | os.PathLike, device: str = "cpu"):
    """Split ``valfree score`` across the ranks that torchrun started, and merge their rows on exit.

    Outside torchrun (no ``WORLD_SIZE`` > 1 in the environment) this yields a one-rank run whose
    ``part`` is ``out`` itself. Under torchrun it joins the process group (gloo on CPU, NCCL on CUDA)
    unless one exists, folds part files left by an interrupted run into ``out``, and yields this
    rank's :class:`ScoringRun`. On a clean exit rank 0 merges the parts into ``out`` in step order;
    after an exception the parts stay on disk and the next run merges them, so nothing scored is lost.
    """
    out = Path(out)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    created = False
    if world > 1 and not (dist.is_available() and dist.is_initialized()):
        backend = "nccl" if device.startswith("cuda") and torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
        created = True
    rank, world = rank_and_world()
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    run = ScoringRun(rank, world, out, rank_device(device, local_rank))
    if run.device.startswith("cuda:"):
        torch.cuda.set_device(torch.device(run.device))
    try:
        if rank == 0:
            merge_parts(out)  # leftovers of an interrupted run, before any rank reads what is done
        if world > 1:
            dist.barrier()
        yield run
        if world > 1:
            dist.barrier()
        if rank == 0 and world > 1:
            merge_parts(out)
        if world > 1:
            dist.barrier()
    finally:
        if created:
            dist.destroy_process_group()
