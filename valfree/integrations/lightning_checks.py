"""The measurement the two Lightning callbacks share: when to check, what to probe (a fixed batch
or the training forward), the prediction changes, and one measurement per trainer and step.

Split from :mod:`valfree.integrations.lightning`, which holds the callbacks themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import warnings
from typing import Any, Callable

import torch

from ..errors import ValfreeError
from ..probes import HeadGradient, ProbeOptions, capture_head, find_head
from ..batches import label_of
from ..selection.rules import DEFAULT_RULE
from .checks import CheckMeasurer, sample_ids_of
from .monitor import checked_probe_source, probe_capture
from .sampling import DEFAULT_PROBE_SIZE, DEFAULT_SEED
from .tracking import DEFAULT_PATIENCE, DEFAULT_WARMUP, ScoreTracker

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, Checkpoint
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("valfree.lightning needs Lightning: pip install 'valfree[lightning]'.") from None


def default_targets(batch) -> Any:
    """The labels of a training batch: the second item of a tuple, or a dict's ``y``, ``label``, ``labels``,
    ``target`` or ``targets`` (see :mod:`valfree.probes.batches`)."""
    targets = label_of(batch)
    if targets is not None:
        return targets
    raise ValfreeError(
        "cannot find the targets in the training batch; pass targets_from_batch=lambda batch: ... to the callback."
    )


class _Shared:
    """One trainer's measurement for every callback with the same probe settings: the fixed data, the
    piggyback capture, and the last check's result, so that a step is measured once."""

    def __init__(self, measurer: CheckMeasurer, piggyback: bool, targets_from_batch):
        self.measurer, self.piggyback = measurer, piggyback
        self.targets_from_batch = targets_from_batch or default_targets
        self.stack = contextlib.ExitStack()
        self.capture = None  # the head's last training forward (piggyback probe, or sample-index PC)
        self.targets = self.last = None
        self.cache: tuple[int, object] | None = None  # (global_step, (probe, columns))
        self.seen: set = set()  # (hook, step, batch_idx) already handled by one of the callbacks
        self.ids = None
        self.labels = None
        self.users = 0

    def once(self, *key) -> bool:
        if key in self.seen:
            return False
        self.seen = {k for k in self.seen if k[1] == key[1]}
        self.seen.add(key)
        return True

    def head_capture(self, pl_module, batch=None):
        if self.capture is None:
            if batch is not None and not self.measurer.ready:
                self.measurer.offer_batch(batch)
            self.measurer.prepare(pl_module)
            self.capture = self.stack.enter_context(capture_head(self.measurer.head))
        return self.capture

    def close(self) -> None:
        self.stack.close()
        self.capture = None


class _Prober:
    """Measures a callback's checks through the trainer's :class:`_Shared` for its settings."""

    def __init__(self, probe_batch, piggyback, options: ProbeOptions, targets_from_batch, rule: str,
                 pred_subset, probe_size: int, seed: int):
        pred_subset = checked_probe_source("the callback", "(inputs, targets) for fixed-batch mode", probe_batch,
                                           piggyback, rule, pred_subset)
        self.probe_batch, self.piggyback, self.requested = probe_batch, piggyback, options
        self.targets_from_batch = targets_from_batch
        self.pred_subset, self.probe_size, self.seed = pred_subset, probe_size, seed
        self.shared: _Shared | None = None
        self._pending_state = None

    def _key(self):
        r = self.requested
        return (id(self.probe_batch) if self.probe_batch is not None else None, self.piggyback,
                r.head if isinstance(r.head, (str, type(None))) else id(r.head), repr(r.loss), r.label_smoothing,
                r.ignore_index, self.pred_subset, self.probe_size, self.seed, id(self.targets_from_batch))

    @property
    def head(self):
        return self.shared.measurer.head if self.shared is not None else None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        registry = trainer.__dict__.setdefault("_valfree_shared", {})
        key = self._key()
        if key not in registry:
            measurer = CheckMeasurer(self.probe_batch, options=self.requested, pred_subset=self.pred_subset,
                                     probe_size=self.probe_size, seed=self.seed, shard=True)
            registry[key] = _Shared(measurer, self.piggyback, self.targets_from_batch)
        self.shared = registry[key]
        self.shared.users += 1
        if self.probe_batch is not None:
            self.shared.measurer.prepare(pl_module)
        if self.piggyback:
            measurer = self.shared.measurer
            measurer.head = measurer.head or find_head(pl_module, self.requested.head)
            measurer.options = dataclasses.replace(self.requested, head=measurer.head.module)
            if self.shared.capture is None:
                self.shared.capture = self.shared.stack.enter_context(capture_head(measurer.head))

    def load_state(self, state) -> None:
        if state:
            if self.shared is not None:
                self.shared.measurer.load_state_dict(state)
            else:
                self._pending_state = state

    def state(self) -> dict | None:
        return self.shared.measurer.state_dict() if self.shared is not None else self._pending_state

    def teardown(self, trainer) -> None:
        if self.shared is None:
            return
        self._pending_state = self.shared.measurer.state_dict()  # what a later fit resumes from
        self.shared.users -= 1
        if self.shared.users <= 0:
            self.shared.close()
            trainer.__dict__.get("_valfree_shared", {}).pop(self._key(), None)
        self.shared = None

    def on_train_start(self, trainer, schedule: "_ProbeSchedule") -> None:
        if self._pending_state is not None:
            self.shared.measurer.load_state_dict(self._pending_state)
            self._pending_state = None
        if self.pred_subset is None and self.probe_batch is None:
            # Budgeted against the training between two checks (docs/integrations.md, "Cost of
            # prediction changes"); a subset restored from a saved state keeps its size.
            self.shared.measurer.budget_subset(_trained_per_check(trainer, schedule))
        loader = trainer.train_dataloader
        if hasattr(loader, "dataset"):
            self.shared.measurer.offer_loader(loader)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        sh = self.shared
        if not sh.once("start", trainer.global_step, batch_idx):
            return
        sh.measurer.offer_batch(batch)
        if sh.piggyback:
            sh.targets = sh.targets_from_batch(batch)
        sh.ids = sample_ids_of(batch) if sh.measurer.pred_subset > 0 else None
        if sh.ids is not None:
            sh.labels = label_of(batch)
            sh.head_capture(pl_module, batch)

    def on_train_batch_end(self, trainer, batch_idx) -> None:
        sh = self.shared
        if sh.ids is None or not sh.once("end", trainer.global_step, batch_idx):
            return
        labels = sh.labels if isinstance(sh.labels, torch.Tensor) and sh.labels.dim() == 1 else None
        if sh.capture is not None and sh.capture.logits is not None:
            sh.measurer.observe(sh.ids, sh.capture.logits, labels)
        sh.ids = None

    def on_before_optimizer_step(self, trainer, due: bool) -> None:
        """Piggyback: measure while the head still holds the weights that produced the captured logits,
        and only before a step that ends in a check. With gradient accumulation this is the last
        micro-batch of the step."""
        sh = self.shared
        if not sh.piggyback or not due or sh.capture is None or sh.capture.features is None:
            return
        if not sh.once("optimizer", trainer.global_step, None):
            return
        sh.last = probe_capture(sh.capture, sh.measurer.head, sh.targets, sh.measurer.options)

    def measure(self, trainer, pl_module: "pl.LightningModule"):
        """(probe, columns) of this step, measured once per trainer and step; probe None when the step
        had no optimizer step (piggyback)."""
        sh = self.shared
        if sh.cache is not None and sh.cache[0] == trainer.global_step:
            return sh.cache[1]
        if sh.piggyback:
            probe, sh.last = sh.last, None
            if sh.measurer.pred_subset > 0 and (sh.measurer.ready or sh.measurer.buffer.count):
                sh.measurer.prepare(pl_module)
        else:
            sh.measurer.prepare(pl_module)
            probe = sh.measurer.probe(pl_module)
        probe = trainer.strategy.broadcast(probe)  # rank 0's numbers everywhere
        columns = sh.measurer.columns(pl_module) if probe is not None else {}
        sh.cache = (trainer.global_step, (probe, columns))
        return probe, columns


class _ProbeSchedule:
    """When a callback checks: every n optimizer steps, or every n epochs (the default: each epoch)."""

    def __init__(self, every_n_train_steps, every_n_epochs):
        if every_n_train_steps is not None and every_n_epochs is not None:
            raise ValfreeError("set every_n_train_steps or every_n_epochs, not both.")
        if every_n_train_steps is None and every_n_epochs is None:
            every_n_epochs = 1
        for name, value in (("every_n_train_steps", every_n_train_steps), ("every_n_epochs", every_n_epochs)):
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValfreeError(f"{name} must be a positive integer, not {value!r}.")
        self.every_n_train_steps, self.every_n_epochs = every_n_train_steps, every_n_epochs

    def on_batch_end(self, trainer) -> bool:
        n = self.every_n_train_steps
        return n is not None and trainer.global_step > 0 and trainer.global_step % n == 0

    def on_epoch_end(self, trainer) -> bool:
        n = self.every_n_epochs
        return n is not None and (trainer.current_epoch + 1) % n == 0

    def after_this_step(self, trainer) -> bool:
        """Will a check follow the optimizer step about to run? (global_step is not yet incremented.)"""
        if self.every_n_train_steps is not None:
            return (trainer.global_step + 1) % self.every_n_train_steps == 0
        progress = getattr(getattr(trainer.fit_loop, "epoch_loop", None), "batch_progress", None)
        last_batch = getattr(progress, "is_last_batch", True)
        return bool(last_batch) and self.on_epoch_end(trainer)


def _trained_per_check(trainer: "pl.Trainer", schedule: _ProbeSchedule) -> int | None:
    """Training inputs between two checks, summed over ranks (None when Lightning cannot say)."""
    batch = getattr(trainer.train_dataloader, "batch_size", None)
    if not batch:
        return None
    if schedule.every_n_train_steps is not None:
        steps = schedule.every_n_train_steps * trainer.accumulate_grad_batches
    else:
        steps = trainer.num_training_batches * schedule.every_n_epochs
    return int(steps * batch * trainer.world_size) if math.isfinite(steps) else None


def _should_skip(trainer: "pl.Trainer") -> bool:
    return bool(trainer.fast_dev_run) or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING


def _expected_checks(trainer, schedule: "_ProbeSchedule") -> int | None:
    """How many checks the run will make, when Lightning knows its length."""
    if schedule.every_n_train_steps is not None:
        try:
            total = trainer.estimated_stepping_batches
        except Exception:  # noqa: BLE001 - no length known (e.g. an iterable dataset without max_steps)
            return None
        if total is None or not math.isfinite(total):
            return None
        return max(1, int(total) // schedule.every_n_train_steps)
    epochs = trainer.max_epochs
    if epochs is None or epochs < 0:
        return None
    return max(1, epochs // schedule.every_n_epochs)
