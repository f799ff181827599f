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
        if piggyback and probe_batch is not None:
            raise ValfreeError(
                "give the callback either probe_batch=(inputs, targets) for fixed-batch mode or piggyback=True, not both."
            )
        if probe_batch is not None:
            split_probe_batch(probe_batch)  # one clear error now rather than at the first check
        if pred_subset is None and not needs_predictions(rule):
            pred_subset = 0
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

    def on_train_start(self, trainer) -> None:
        if self._pending_state is not None:
            self.shared.measurer.load_state_dict(self._pending_state)
            self._pending_state = None
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


class _LabelFreeHooks:
    """The hooks both callbacks share; subclasses implement ``_check``."""

    _prober: _Prober
    _schedule: _ProbeSchedule

    def setup(self, trainer, pl_module, stage: str) -> None:
        self._prober.setup(trainer, pl_module)

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._prober.teardown(trainer)

    def on_train_start(self, trainer, pl_module) -> None:
        self._prober.on_train_start(trainer)
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
