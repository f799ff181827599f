"""Lightning callbacks: keep the best checkpoints and stop early by the head-gradient probe, with no
validation loop.

``LabelFreeCheckpoint`` subclasses Lightning's ``Checkpoint``, so the Trainer treats it as its
checkpoint callback: ``trainer.checkpoint_callback`` is this object, ``best_model_path`` is the
checkpoint the selection rule chooses, and ``trainer.test(ckpt_path="best")`` loads it. Its state (the
score series, the kept files, the best path) is stored in every checkpoint and restored on resume.
``LabelFreeEarlyStopping`` sets ``trainer.should_stop`` by the core early-stopping rule.

Both log the score with ``pl_module.log``, so every Lightning logger receives it (step-based checks
reach the loggers on Lightning's ``log_every_n_steps`` schedule, as any metric logged in a training
hook does). Under DDP each rank probes its share of the fixed batch (or its own training batch, when
piggybacking); the probe covers the global batch, rank 0's result is broadcast through the strategy so
that every rank records the same numbers, and the stop decision goes through
``strategy.reduce_boolean_decision``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from typing import Any, Callable

import torch

from ..errors import ValfreeError
from ..probes import HeadGradient, ProbeOptions, capture_head, find_head
from ..batches import label_of
from .distributed import shard_batch
from .monitor import probe_capture, probe_fixed_batch, split_probe_batch
from .tracking import ScoreTracker

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, Checkpoint
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("valfree.lightning needs Lightning: pip install 'valfree[lightning]'.") from None

__all__ = ["LabelFreeCheckpoint", "LabelFreeEarlyStopping", "default_targets"]


def default_targets(batch) -> Any:
    """The labels of a training batch: the second item of a tuple, or a dict's ``y``, ``label``, ``labels``,
    ``target`` or ``targets`` (see :mod:`valfree.probes.batches`)."""
    targets = label_of(batch)
    if targets is not None:
        return targets
    raise ValfreeError(
        "cannot find the targets in the training batch; pass targets_from_batch=lambda batch: ... to the callback."
    )


class _Prober:
    """Measures the probe for a callback: on the rank's share of a fixed batch, or by piggybacking."""

    def __init__(self, probe_batch, piggyback, options: ProbeOptions, targets_from_batch):
        if piggyback == (probe_batch is not None):
            raise ValfreeError(
                "give the callback either probe_batch=(inputs, targets) for fixed-batch mode or piggyback=True, not both or neither."
            )
        self.batch = split_probe_batch(probe_batch) if probe_batch is not None else None
        self.piggyback, self.requested, self.options = piggyback, options, options
        self.targets_from_batch = targets_from_batch or default_targets
        self._stack = contextlib.ExitStack()
        self._capture = self._targets = self._last = None
        self.head = None

    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self.head = find_head(pl_module, self.requested.head)
        self.options = dataclasses.replace(self.requested, head=self.head.module)  # found once, not at every probe
        if self.batch is not None:
            inputs, targets = self.batch
            rank, world = trainer.global_rank, trainer.world_size
            self.shard = shard_batch(inputs, rank, world), shard_batch(targets, rank, world)
        if self.piggyback and self._capture is None:
            self._capture = self._stack.enter_context(capture_head(self.head))

    def teardown(self) -> None:
        self._stack.close()
        self._capture = None

    def on_train_batch_start(self, batch) -> None:
        if self.piggyback:
            self._targets = self.targets_from_batch(batch)

    def on_before_optimizer_step(self, due: bool) -> None:
        """Piggyback: measure while the head still holds the weights that produced the captured logits,
        and only before a step that ends in a check. With gradient accumulation this is the last
        micro-batch of the step."""
        if not self.piggyback or not due or self._capture.features is None:
            return
        self._last = probe_capture(self._capture, self.head, self._targets, self.options)

    def measure(self, pl_module: "pl.LightningModule") -> HeadGradient | None:
        if self.piggyback:  # None when the step had no optimizer step (e.g. skipped by the AMP scaler)
            result, self._last = self._last, None
            return result
        return probe_fixed_batch(pl_module, self.head, *self.shard, self.options)


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


def _should_skip(trainer: "pl.Trainer") -> bool:
    return bool(trainer.fast_dev_run) or trainer.sanity_checking or trainer.state.fn != TrainerFn.FITTING


class _LabelFreeHooks:
    """The hooks both callbacks share; subclasses implement ``_check``."""

    _prober: _Prober
    _schedule: _ProbeSchedule

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._prober.setup(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._prober.teardown()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._prober.on_train_batch_start(batch)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._prober.on_before_optimizer_step(self._schedule.after_this_step(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._schedule.on_batch_end(trainer) and not _should_skip(trainer):
            self._run_check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._schedule.on_epoch_end(trainer) and not _should_skip(trainer):
            self._run_check(trainer, pl_module)

    def _run_check(self, trainer, pl_module) -> None:
        if self.tracker.steps and trainer.global_step <= self.tracker.steps[-1]:
            return  # already checked at this step (an epoch that ended on a step check)
        probe = trainer.strategy.broadcast(self._prober.measure(pl_module))  # rank 0's numbers everywhere
        if probe is not None:
            self._check(trainer, pl_module, probe)

    def _log(self, pl_module, name: str, value: float) -> None:
        # The value is already global (and broadcast), so Lightning must not average it again.
        pl_module.log(name, float(value), prog_bar=False, logger=True, sync_dist=False)


class LabelFreeCheckpoint(_LabelFreeHooks, Checkpoint):
    """Save the top-k checkpoints by the label-free probe score, with no validation loop.

    Args:
        probe_batch: the fixed probe batch, ``(inputs, targets)`` or a dict with ``labels``; targets
            may be ``"pseudo"``. Pass the same batch on every rank; each rank probes its share.
        piggyback: measure the training forward instead (no extra forward pass); the labels come from
            ``targets_from_batch(batch)`` (default: ``batch[1]`` or ``batch["labels"]``).
        dirpath: folder for the checkpoints (default: ``<trainer.log_dir>/checkpoints``).
        filename: a format string with ``{epoch}`` and ``{step}``; ``.ckpt`` is appended.
        every_n_train_steps, every_n_epochs: when to check (default: every epoch).
        save_top_k: retention, as in :class:`valfree.integrations.tracking.ScoreTracker`
            (-1 keeps every checkpoint; the chosen one is never deleted).
        score, mode, tail, ema: the selection rule of :func:`valfree.select_checkpoint`.
        results: a CSV in the format of ``valfree score`` (written by rank 0).
        log_name: the logged metric (default ``valfree/<score>``).

    Attributes follow ``ModelCheckpoint``: ``best_model_path``, ``best_model_score`` (the smoothed
    score), ``best_k_models`` (kept path -> smoothed score), ``current_score``, ``last_model_path``.
    """

    def __init__(
        self,
        probe_batch=None,
        *,
        piggyback: bool = False,
        dirpath: str | os.PathLike | None = None,
        filename: str = "epoch={epoch}-step={step}",
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        save_top_k: int = 1,
        save_weights_only: bool = False,
        score: str = "grad_norm",
        mode: str = "min",
        tail: float | int = 0.2,
        ema: float = 3,
        head=None,
        loss="ce",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        targets_from_batch: Callable | None = None,
        results: str | os.PathLike | None = None,
        log_name: str | None = None,
    ):
        super().__init__()
        if "{step" not in filename:
            raise ValfreeError(f"filename {filename!r} must contain '{{step}}' so that checkpoints do not overwrite each other.")
        options = ProbeOptions(head, loss, label_smoothing, ignore_index)
        self._prober = _Prober(probe_batch, piggyback, options, targets_from_batch)
        self._schedule = _ProbeSchedule(every_n_train_steps, every_n_epochs)
        self.tracker = ScoreTracker(score, mode, tail, ema, save_top_k, results=results)
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.filename, self.save_weights_only = filename, save_weights_only
        self.log_name = log_name or f"valfree/{score}"
        self.best_model_path = ""
        self.best_model_score: torch.Tensor | None = None
        self.best_k_models: dict[str, torch.Tensor] = {}
        self.current_score: torch.Tensor | None = None
        self.last_model_path = ""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            score=self.tracker.score, mode=self.tracker.mode,
            every_n_train_steps=self._schedule.every_n_train_steps, every_n_epochs=self._schedule.every_n_epochs,
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        self.dirpath = trainer.strategy.broadcast(self.dirpath)  # one folder even if ranks resolved it apart
        if not trainer.is_global_zero:
            self.tracker.results = None

    def _check(self, trainer, pl_module, probe: HeadGradient) -> None:
        self._log(pl_module, self.log_name, getattr(probe, self.tracker.score))
        name = self.filename.format(epoch=trainer.current_epoch, step=trainer.global_step) + ".ckpt"
        path = os.path.join(self.dirpath, name)
        self.tracker.record(trainer.global_step, probe, path, save=lambda p: self._save(trainer, p),
                            remove=trainer.strategy.remove_checkpoint)

    def _save(self, trainer, path: str) -> None:
        self._sync_attributes()  # the file's copy of this callback's state must already name itself
        self.last_model_path = path
        trainer.save_checkpoint(path, self.save_weights_only)  # every rank calls; the strategy writes once

    def _sync_attributes(self) -> None:
        tracker = self.tracker
        self.current_score = torch.tensor(tracker.smoothed[-1]) if tracker.smoothed else None
        self.best_k_models = {tracker.paths[i]: torch.tensor(tracker.smoothed[i]) for i in sorted(tracker.kept)}
        best = tracker.best()
        self.best_model_path = best.path if best is not None else ""
        self.best_model_score = torch.tensor(best.score) if best is not None else None

    def _run_check(self, trainer, pl_module) -> None:
        super()._run_check(trainer, pl_module)
        self._sync_attributes()

    def state_dict(self) -> dict[str, Any]:
        # Plain Python values only, so that `valfree score` can read these checkpoints with weights_only=True.
        return {
            "dirpath": self.dirpath,
            "best_model_path": self.best_model_path,
            "last_model_path": self.last_model_path,
            "tracker": self.tracker.state_dict(),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.dirpath is not None and state_dict.get("dirpath") != self.dirpath:
            warnings.warn(
                f"LabelFreeCheckpoint: the checkpoint folder changed from {state_dict.get('dirpath')!r} to "
                f"{self.dirpath!r}; only best_model_path is restored, the score series starts afresh."
            )
            self.best_model_path = state_dict["best_model_path"]
            return
        self.dirpath = state_dict["dirpath"]
        self.tracker.load_state_dict(state_dict["tracker"])
        self.last_model_path = state_dict.get("last_model_path", "")
        self._sync_attributes()


class LabelFreeEarlyStopping(_LabelFreeHooks, Callback):
    """Stop training when the EMA-smoothed probe score stops improving, with no validation loop.

    Takes the probe arguments and schedule of :class:`LabelFreeCheckpoint`, plus ``patience`` (checks
    without an improvement larger than ``min_delta``) and ``ema``. Logs the smoothed score it decides
    on as ``valfree/<score>_ema``. ``stopped_step`` and ``stopped_epoch`` record where it stopped
    (0 if it did not).
    """

    def __init__(
        self,
        probe_batch=None,
        *,
        piggyback: bool = False,
        patience: int = 5,
        min_delta: float = 0.0,
        score: str = "grad_norm",
        mode: str = "min",
        ema: float = 3,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        head=None,
        loss="ce",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        targets_from_batch: Callable | None = None,
        log_name: str | None = None,
    ):
        super().__init__()
        options = ProbeOptions(head, loss, label_smoothing, ignore_index)
        self._prober = _Prober(probe_batch, piggyback, options, targets_from_batch)
        self._schedule = _ProbeSchedule(every_n_train_steps, every_n_epochs)
        self.tracker = ScoreTracker(score, mode, tail=1.0, ema=ema, save_top_k=0, patience=patience, min_delta=min_delta)
        self.log_name = log_name or f"valfree/{score}_ema"
        self.stopped_step = 0
        self.stopped_epoch = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            score=self.tracker.score, mode=self.tracker.mode, patience=self.patience,
            every_n_train_steps=self._schedule.every_n_train_steps, every_n_epochs=self._schedule.every_n_epochs,
        )

    @property
    def patience(self) -> int:
        return self.tracker.early_stopping.patience

    @property
    def wait_count(self) -> int:
        return self.tracker.early_stopping.wait

    @property
    def best_score(self) -> float:
        return self.tracker.early_stopping.best

    def _check(self, trainer, pl_module, probe: HeadGradient) -> None:
        self.tracker.record(trainer.global_step, probe)
        self._log(pl_module, self.log_name, self.tracker.early_stopping.smoothed)
        # Any rank's stop stops all of them, as Lightning's own EarlyStopping decides.
        should_stop = trainer.strategy.reduce_boolean_decision(self.tracker.should_stop(), all=False)
        if should_stop and not trainer.should_stop:
            self.stopped_step, self.stopped_epoch = trainer.global_step, trainer.current_epoch
        trainer.should_stop = trainer.should_stop or should_stop

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "stopped_step": self.stopped_step, "stopped_epoch": self.stopped_epoch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self.stopped_step = int(state_dict.get("stopped_step", 0))
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))
