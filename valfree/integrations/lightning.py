"""Lightning callbacks: keep the best checkpoints and stop early by a label-free selection rule, with
no validation loop.

``LabelFreeCheckpoint`` subclasses Lightning's ``Checkpoint``, so the Trainer treats it as its
checkpoint callback: ``trainer.checkpoint_callback`` is this object, ``best_model_path`` is the
checkpoint the rule chooses, and ``trainer.test(ckpt_path="best")`` loads it; by default the chosen
weights are also loaded into the model when fit ends. Its state (the score series, the kept files, the
probe data) is stored in every checkpoint and restored on resume. ``LabelFreeEarlyStopping`` sets
``trainer.should_stop`` by the rule, never during the warm-up.

Both work with no arguments. The probe batch and the prediction-change subset are then a seeded draw
of the training dataset (collated by the train loader's ``collate_fn``), or, for an iterable dataset,
the rows of the first training batches. A dict batch with an ``index``/``idx`` entry (each sample's
position in the training set) makes prediction changes count on the training forward itself.

At each check both callbacks share one measurement (the probe and the prediction changes), made once
per trainer and step. The scores go straight to every logger of the Trainer at the check's step (and
only there). Under DDP each rank probes its share of the fixed data; the probe covers the global
batch, rank 0's result is broadcast through the strategy, the prediction-change counts are summed
across ranks, and the stop decision goes through ``strategy.reduce_boolean_decision``.
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
from .monitor import probe_capture, split_probe_batch
from .sampling import DEFAULT_PROBE_SIZE, DEFAULT_SEED
from .tracking import DEFAULT_PATIENCE, DEFAULT_WARMUP, ScoreTracker, needs_predictions

try:
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import Callback, Checkpoint
    from lightning.pytorch.trainer.states import TrainerFn
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("valfree.lightning needs Lightning: pip install 'valfree[lightning]'.") from None

__all__ = ["LabelFreeCheckpoint", "LabelFreeEarlyStopping", "default_targets"]


from .lightning_checks import _expected_checks, _Prober, _ProbeSchedule, _Shared, _should_skip, default_targets  # noqa: E402,F401


class _LabelFreeHooks:
    """The hooks both callbacks share; subclasses implement ``_check``."""

    _prober: _Prober
    _schedule: _ProbeSchedule

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._prober.setup(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._prober.teardown(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._prober.on_train_start(trainer, self._schedule)
        self.tracker.expected_checks = _expected_checks(trainer, self._schedule)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._prober.on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self._prober.on_before_optimizer_step(trainer, self._schedule.after_this_step(trainer))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._prober.on_train_batch_end(trainer, batch_idx)
        if self._schedule.on_batch_end(trainer) and not _should_skip(trainer):
            self._run_check(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._schedule.on_epoch_end(trainer) and not _should_skip(trainer):
            self._run_check(trainer, pl_module)

    def _run_check(self, trainer, pl_module) -> None:
        if self.tracker.steps and trainer.global_step <= self.tracker.steps[-1]:
            return  # already checked at this step (an epoch that ended on a step check)
        probe, columns = self._prober.measure(trainer, pl_module)
        if probe is not None:
            self._check(trainer, pl_module, probe, columns)

    def _log(self, trainer, metrics: dict) -> None:
        """Send the check's values to every logger at this step, and only at check steps. They are
        global already (broadcast, or reduced over ranks), so rank 0 logs them."""
        metrics = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        if not metrics or not trainer.is_global_zero:
            return
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


_COMMON_ARGS = """
        probe_batch: the fixed probe batch, ``(inputs, targets)`` or a dict with ``labels``; targets
            may be ``"pseudo"``. Pass the same batch on every rank; each rank probes its share. None:
            a seeded draw of the training data (see the module docstring).
        piggyback: measure the training forward instead (no extra forward pass); the labels come from
            ``targets_from_batch(batch)`` (default: ``batch[1]`` or ``batch["labels"]``).
        rule: the selection rule of ``valfree select --rule`` (default ``DEFAULT_RULE``).
        every_n_train_steps, every_n_epochs: when to check (default: every epoch).
        warmup: no stop during the first ``warmup`` checks (a count) or share of the run's expected
            checks (a fraction; Lightning knows the length from ``estimated_stepping_batches`` or
            ``max_epochs``). Default 0.2.
        pred_subset: training inputs in the prediction-change subset (0: none; default
            ``DEFAULT_PRED_SUBSET``, or 0 for ``rule="probe"``). probe_size, seed: the drawn probe batch.
"""


class LabelFreeCheckpoint(_LabelFreeHooks, Checkpoint):
    __doc__ = """Keep the checkpoints a label-free selection rule may choose, with no validation loop.

    Args:""" + _COMMON_ARGS + """        dirpath: folder for the checkpoints (default: ``<trainer.log_dir>/checkpoints``).
        filename: a format string with ``{epoch}`` and ``{step}``; ``.ckpt`` is appended.
        save_top_k: how many checkpoint files are left when fit ends: the rule's choice and the
            ``save_top_k - 1`` best smoothed scores besides it (-1 keeps every one, 0 saves none).
            During training up to two more are kept: the rule's other candidates (the probe's choice
            and the Label Wave point), either of which may become the choice.
        save_last: also keep the latest checkpoint when fit ends (``last_model_path``), to resume from.
        score, mode, tail, ema: the probe the rule follows (see :func:`valfree.select_checkpoint`).
        load_best_at_end: load the chosen checkpoint's weights into the module when fit ends.
        results: a CSV in the format of ``valfree score`` (written by rank 0), with the columns
            ``pred_change``, ``label_agreement`` and ``pred_subset``.
        log_name: the logged metric (default ``valfree/<score>``).

    Attributes follow ``ModelCheckpoint``: ``best_model_path``, ``best_model_score`` (the smoothed
    score), ``best_k_models`` (kept path -> smoothed score), ``current_score``, ``last_model_path``.
    """

    def __init__(
        self,
        probe_batch=None,
        *,
        piggyback: bool = False,
        rule: str = DEFAULT_RULE,
        dirpath: str | os.PathLike | None = None,
        filename: str = "epoch={epoch}-step={step}",
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        save_top_k: int = 1,
        save_last: bool = False,
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
        pred_subset: int | None = None,
        probe_size: int = DEFAULT_PROBE_SIZE,
        seed: int = DEFAULT_SEED,
        load_best_at_end: bool = True,
        results: str | os.PathLike | None = None,
        log_name: str | None = None,
    ):
        super().__init__()
        if "{step" not in filename:
            raise ValfreeError(f"filename {filename!r} must contain '{{step}}' so that checkpoints do not overwrite each other.")
        options = ProbeOptions(head, loss, label_smoothing, ignore_index)
        self._prober = _Prober(probe_batch, piggyback, options, targets_from_batch, rule, pred_subset, probe_size, seed)
        self._schedule = _ProbeSchedule(every_n_train_steps, every_n_epochs)
        self.tracker = ScoreTracker(score, mode, tail, ema, save_top_k, results=results, rule=rule)
        self.dirpath = os.fspath(dirpath) if dirpath is not None else None
        self.filename, self.save_weights_only = filename, save_weights_only
        self.load_best_at_end, self.save_last = load_best_at_end, save_last
        self.log_name = log_name or f"valfree/{score}"
        self.best_model_path = ""
        self.best_model_score: torch.Tensor | None = None
        self.best_k_models: dict[str, torch.Tensor] = {}
        self.current_score: torch.Tensor | None = None
        self.last_model_path = ""

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            score=self.tracker.score, mode=self.tracker.mode, rule=self.tracker.rule,
            every_n_train_steps=self._schedule.every_n_train_steps, every_n_epochs=self._schedule.every_n_epochs,
        )

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if self.dirpath is None:
            self.dirpath = os.path.join(trainer.log_dir or trainer.default_root_dir, "checkpoints")
        self.dirpath = trainer.strategy.broadcast(self.dirpath)  # one folder even if ranks resolved it apart
        if not trainer.is_global_zero:
            self.tracker.results = None

    def _check(self, trainer, pl_module, probe: HeadGradient, columns: dict) -> None:
        self._log(trainer, {self.log_name: getattr(probe, self.tracker.score),
                            "valfree/pred_change": columns.get("pred_change"),
                            "valfree/label_agreement": columns.get("label_agreement")})
        name = self.filename.format(epoch=trainer.current_epoch, step=trainer.global_step) + ".ckpt"
        path = os.path.join(self.dirpath, name)
        self.tracker.record(trainer.global_step, probe, path, save=lambda p: self._save(trainer, p),
                            remove=trainer.strategy.remove_checkpoint, columns=columns)

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

    def on_train_end(self, trainer, pl_module) -> None:
        if _should_skip_end(trainer):
            return
        self.tracker.finish(trainer.strategy.remove_checkpoint, keep_last=self.save_last)
        self._sync_attributes()
        if self.last_model_path not in self.tracker.kept_paths:
            self.last_model_path = ""
        trainer.strategy.barrier("valfree_finish")
        if self.load_best_at_end and self.best_model_path and os.path.exists(self.best_model_path):
            checkpoint = torch.load(self.best_model_path, map_location="cpu", weights_only=True)
            pl_module.load_state_dict(checkpoint["state_dict"])

    def state_dict(self) -> dict[str, Any]:
        # Plain Python values (and, for rows drawn from batches, tensors) only, so that `valfree score`
        # can read these checkpoints with weights_only=True.
        return {
            "dirpath": self.dirpath,
            "best_model_path": self.best_model_path,
            "last_model_path": self.last_model_path,
            "tracker": self.tracker.state_dict(),
            "probe_data": self._prober.state(),
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
        self._prober.load_state(state_dict.get("probe_data"))
        self.last_model_path = state_dict.get("last_model_path", "")
        self._sync_attributes()


class LabelFreeEarlyStopping(_LabelFreeHooks, Callback):
    __doc__ = """Stop training when the label-free selection rule says so, never during the warm-up.

    The rule stops when the probe's smoothed score has not improved by ``min_delta`` for ``patience``
    checks (rules ``probe``, ``guarded``, ``guarded-wave``), or when the Label Wave point is confirmed
    and, for the guarded rules, the memorisation guard fired on it. Logs the smoothed score as
    ``valfree/<score>_ema``. ``stopped_step`` and ``stopped_epoch`` record where it stopped (0 if it
    did not).

    Args:""" + _COMMON_ARGS + """        patience, min_delta: as above; score, mode, tail, ema: the probe the rule follows.
    """

    def __init__(
        self,
        probe_batch=None,
        *,
        piggyback: bool = False,
        rule: str = DEFAULT_RULE,
        patience: int = DEFAULT_PATIENCE,
        min_delta: float = 0.0,
        warmup: float | int = DEFAULT_WARMUP,
        score: str = "grad_norm",
        mode: str = "min",
        tail: float | int = 0.2,
        ema: float = 3,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = None,
        head=None,
        loss="ce",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        targets_from_batch: Callable | None = None,
        pred_subset: int | None = None,
        probe_size: int = DEFAULT_PROBE_SIZE,
        seed: int = DEFAULT_SEED,
        log_name: str | None = None,
    ):
        super().__init__()
        options = ProbeOptions(head, loss, label_smoothing, ignore_index)
        self._prober = _Prober(probe_batch, piggyback, options, targets_from_batch, rule, pred_subset, probe_size, seed)
        self._schedule = _ProbeSchedule(every_n_train_steps, every_n_epochs)
        self.tracker = ScoreTracker(score, mode, tail=tail, ema=ema, save_top_k=0, patience=patience,
                                    min_delta=min_delta, rule=rule, warmup=warmup)
        self.log_name = log_name or f"valfree/{score}_ema"
        self.stopped_step = 0
        self.stopped_epoch = 0

    @property
    def state_key(self) -> str:
        return self._generate_state_key(
            score=self.tracker.score, mode=self.tracker.mode, patience=self.patience, rule=self.tracker.rule,
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

    def _check(self, trainer, pl_module, probe: HeadGradient, columns: dict) -> None:
        self.tracker.record(trainer.global_step, probe, columns=columns)
        self._log(trainer, {self.log_name: self.tracker.early_stopping.smoothed})
        # Any rank's stop stops all of them, as Lightning's own EarlyStopping decides.
        should_stop = trainer.strategy.reduce_boolean_decision(self.tracker.should_stop(), all=False)
        if should_stop and not trainer.should_stop:
            self.stopped_step, self.stopped_epoch = trainer.global_step, trainer.current_epoch
        trainer.should_stop = trainer.should_stop or should_stop

    def state_dict(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state_dict(), "stopped_step": self.stopped_step,
                "stopped_epoch": self.stopped_epoch, "probe_data": self._prober.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state_dict["tracker"])
        self._prober.load_state(state_dict.get("probe_data"))
        self.stopped_step = int(state_dict.get("stopped_step", 0))
        self.stopped_epoch = int(state_dict.get("stopped_epoch", 0))


def _should_skip_end(trainer) -> bool:
    return bool(trainer.fast_dev_run) or trainer.state.fn != TrainerFn.FITTING
