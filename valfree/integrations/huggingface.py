"""A Hugging Face ``TrainerCallback`` that keeps and loads the checkpoint a label-free selection rule
chooses, and can stop training, with ``eval_strategy="no"``.

At every save (``save_strategy="steps"`` or ``"epoch"``) the callback probes its fixed batch (or takes
the value piggybacked on the training step) and measures prediction changes on its fixed training
subset, and before the Trainer writes ``checkpoint-N/``:

- appends the check to ``state.log_history`` (keys ``valfree/<field>``, ``valfree/pred_change``,
  ``valfree/label_agreement``, ``valfree/pred_subset``, plus ``valfree/checkpoint``), so it is stored
  in each ``checkpoint-N/trainer_state.json`` and ``valfree select OUTPUT_DIR`` can read a finished run;
- asks the Trainer to log at this step and adds the same values to the logs ``on_log`` hands to the
  callbacks after it; added with :meth:`LabelFreeCallback.attach`, the callback runs before the
  Trainer's reporting integrations (TensorBoard, W&B, MLflow, ...), so they record the values too;
- sets ``state.best_global_step`` and ``state.best_metric`` to the rule's choice, from which the
  Trainer sets ``state.best_model_checkpoint`` (and protects it from ``save_total_limit``);
- sets ``control.should_training_stop`` when the rule says stop, never during the warm-up (a share of
  ``state.max_steps``).

With no probe batch the probe batch and the subset are a seeded draw of the Trainer's training
dataset, collated by its data collator, and the draw's indices are written next to each checkpoint
(``checkpoint-N/valfree_probe.json``), so a resumed run probes the same rows.

The Trainer loads the best model only with ``load_best_model_at_end``, which demands an evaluation at
every save; so this callback loads ``state.best_model_checkpoint`` itself in ``on_train_end``.

On resume the score series is rebuilt from ``state.log_history``, which the Trainer restores from
``trainer_state.json``. Under DDP every rank probes its share of the fixed batch (or its own
micro-batch), the probe covers the global batch and the prediction-change counts are summed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import warnings
from dataclasses import fields

from ..errors import ValfreeError
from ..io.checkpoints import load_into
from ..io.results import ResultsStore
from ..probes import HeadGradient, ProbeOptions, capture_head, find_head
from ..selection.rules import DEFAULT_RULE
from .checks import CheckMeasurer
from .distributed import agree_any
from .monitor import checked_probe_source, probe_capture
from .sampling import DEFAULT_PROBE_SIZE, DEFAULT_SEED
from .tracking import DEFAULT_WARMUP, PC_COLUMNS, ScoreTracker

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("valfree.huggingface needs transformers: pip install 'valfree[huggingface]'.") from None

__all__ = ["LOG_PREFIX", "LabelFreeCallback"]

LOG_PREFIX = "valfree/"
CHECKPOINT_KEY = LOG_PREFIX + "checkpoint"
STATE_FILE = "valfree_probe.json"
_NUMERIC = tuple(f.name for f in fields(HeadGradient) if f.name not in ("path", "warnings"))


class LabelFreeCallback(TrainerCallback):
    """Label-free best-checkpoint tracking, loading and early stopping for ``transformers.Trainer``.

    Works with no arguments: ``Trainer(..., callbacks=[LabelFreeCallback()])``. To have the scores
    recorded by the integrations the Trainer reports to, add it with :meth:`attach` instead::

        trainer = Trainer(model, args, train_dataset=train)   # report_to="tensorboard", ...
        LabelFreeCallback().attach(trainer)

    Why: the scores reach a reporter only through the ``logs`` dict of ``on_log``, which the Trainer
    builds afresh at each log and hands to its callbacks in list order; a callback can add to it only
    for the callbacks after it. The Trainer puts the callbacks passed to it after its reporters and
    gives callbacks no reference to itself or to that list, so a callback cannot move itself. The
    Trainer can: :meth:`attach` does it with the Trainer's public ``pop_callback`` and ``add_callback``
    (the reporters are taken out and added back after this callback). Given through ``callbacks=``
    with ``report_to`` set, the callback warns once that the reporters will not see its scores; they
    are in ``state.log_history`` and ``trainer_state.json`` either way, and ``valfree select`` reads
    them there.

    Args:
        probe_batch: the fixed batch: a dict of model inputs with ``labels`` (``"pseudo"`` for the
            model's own argmax), or ``(inputs, targets)``. Same batch on every rank under DDP. None: a
            seeded draw of the training dataset (see the module docstring).
        piggyback: use the training step's own forward instead (no extra forward pass); the labels are
            read from the ``labels`` argument of the model call, the logits from the head's output,
            before the optimizer step.
        rule: the selection rule of ``valfree select --rule`` (default ``DEFAULT_RULE``).
        score, mode, tail, ema: the probe the rule follows (see :func:`valfree.select_checkpoint`).
        patience, min_delta: early stopping by the rule (None: never stop).
        warmup: no stop during the first ``warmup`` checks (a count) or share of the run's checks (a
            fraction of ``max_steps``). Default 0.2.
        pred_subset: training inputs in the prediction-change subset (0: none; default
            ``DEFAULT_PRED_SUBSET``, or 0 for ``rule="probe"``). probe_size, seed: the drawn probe batch.
        head, loss, label_smoothing, ignore_index: as for :func:`valfree.head_gradient`.
        load_best_at_end: load ``state.best_model_checkpoint`` into the model when training ends.
        results: optional CSV in the format of ``valfree score`` (written by the main process).
    """

    def __init__(
        self,
        probe_batch=None,
        *,
        piggyback: bool = False,
        rule: str = DEFAULT_RULE,
        score: str = "grad_norm",
        mode: str = "min",
        tail: float | int = 0.2,
        ema: float = 3,
        patience: int | None = None,
        min_delta: float = 0.0,
        warmup: float | int = DEFAULT_WARMUP,
        pred_subset: int | None = None,
        probe_size: int = DEFAULT_PROBE_SIZE,
        seed: int = DEFAULT_SEED,
        head=None,
        loss="ce",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        load_best_at_end: bool = True,
        results: str | os.PathLike | None = None,
    ):
        pred_subset = checked_probe_source("LabelFreeCallback", "(a dict of inputs with 'labels')", probe_batch, piggyback,
                                           rule, pred_subset)
        self.probe_batch = probe_batch
        self.piggyback, self.load_best_at_end = piggyback, load_best_at_end
        self.requested = self.options = ProbeOptions(head, loss, label_smoothing, ignore_index)
        self.measurer_args = dict(options=self.requested, pred_subset=pred_subset, probe_size=probe_size, seed=seed)
        self.measurer = CheckMeasurer(probe_batch, **self.measurer_args)
        # The Trainer rotates checkpoints itself (save_total_limit), so the tracker keeps every path.
        self.tracker_args = dict(score=score, mode=mode, tail=tail, ema=ema, save_top_k=-1, patience=patience,
                                 min_delta=min_delta, results=results, rule=rule, warmup=warmup)
        self.tracker = ScoreTracker(**self.tracker_args)
        self.head = None
        self._stack = contextlib.ExitStack()
        self._capture = None
        self._labels = None
        self._last: HeadGradient | None = None
        self._pending_log: tuple[int, dict] | None = None  # (step, values) for the on_log of that step
        self._attached = self._warned = False

    # ----- setup ------------------------------------------------------------------------------------

    def attach(self, trainer) -> "LabelFreeCallback":
        """Add this callback to ``trainer`` ahead of its reporting integrations, so that they record the
        scores it adds to the logs; returns the callback. Use it instead of ``callbacks=[...]`` (or
        after it: a callback already in the Trainer is moved)."""
        trainer.pop_callback(self)
        reporters = [cb for cb in trainer.callback_handler.callbacks if _is_reporter(cb)]
        for reporter in reporters:
            trainer.pop_callback(reporter)
        trainer.add_callback(self)
        for reporter in reporters:
            trainer.add_callback(reporter)
        self._attached = True
        return self

    def _warn_if_unreported(self, args, state) -> None:
        reporting = [r for r in (args.report_to or []) if r not in (None, "none")]
        if reporting and not self._attached and not self._warned and state.is_world_process_zero:
            warnings.warn(
                f"LabelFreeCallback: the Trainer calls its reporting integrations ({', '.join(map(str, reporting))}) "
                "before the callbacks passed to it, so they will not record the valfree/ scores (state.log_history "
                "still holds them); add the callback with LabelFreeCallback(...).attach(trainer) instead.",
                stacklevel=3,
            )
            self._warned = True

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        self._warn_if_unreported(args, state)
        if args.save_strategy in (SaveStrategy.NO, "no"):
            raise ValfreeError(
                "LabelFreeCallback probes at each save, but save_strategy is 'no'; set save_strategy='steps' (with save_steps) or 'epoch'."
            )
        if args.metric_for_best_model is not None or args.load_best_model_at_end:
            raise ValfreeError(
                "the Trainer is also tracking its own best model (metric_for_best_model / load_best_model_at_end); "
                "unset both, since LabelFreeCallback records and loads the best checkpoint itself."
            )
        self.measurer = CheckMeasurer(self.probe_batch, **self.measurer_args)
        if self.measurer_args["pred_subset"] is None and self.probe_batch is None:
            # Budgeted against the training between two saves (docs/integrations.md, "Cost of prediction
            # changes"); a resumed run with the same arguments gets the same size.
            self.measurer.budget_subset(_trained_per_save(args, state, train_dataloader))
        saved = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}", STATE_FILE)
        if state.global_step > 0 and os.path.isfile(saved):
            with open(saved) as fh:
                self.measurer.load_state_dict(json.load(fh))
        if self.probe_batch is None and train_dataloader is not None:
            self.measurer.offer_loader(train_dataloader)
        if self.piggyback:
            self.head = find_head(model, self.requested.head)
            self.options = dataclasses.replace(self.requested, head=self.head.module)
        if self.measurer.ready or self.measurer.given is not None:
            self.measurer.prepare(model)
            self.head, self.options = self.head or self.measurer.head, self.options if self.piggyback else self.measurer.options
        elif not self.piggyback:
            raise ValfreeError(
                "LabelFreeCallback could not draw a probe batch from the Trainer's training data (it needs a dataset "
                "with len() and indexing); pass probe_batch= or piggyback=True."
            )
        self.tracker = ScoreTracker(**{**self.tracker_args, "results": None})
        self.tracker.expected_checks = self._expected_checks(args, state)
        self._replay(args, state)  # before the results file is attached: replayed rows are already in it
        if self.tracker_args["results"] is not None and state.is_world_process_zero:
            self.tracker.results = ResultsStore(self.tracker_args["results"])
        if self.piggyback and self._capture is None:
            self._capture = self._stack.enter_context(capture_head(self.head))
            handle = model.register_forward_pre_hook(self._grab_labels, with_kwargs=True)
            self._stack.callback(handle.remove)

    @staticmethod
    def _expected_checks(args, state) -> int | None:
        if args.save_strategy in (SaveStrategy.STEPS, "steps"):
            every = state.save_steps if state.save_steps and state.save_steps >= 1 else None
            if every is None or not state.max_steps or state.max_steps <= 0:
                return None
            return max(1, int(state.max_steps // every))
        epochs = state.num_train_epochs or args.num_train_epochs
        return max(1, int(math.ceil(epochs))) if epochs else None

    def _grab_labels(self, module, args, kwargs):
        self._labels = kwargs.get("labels")

    def _replay(self, args, state) -> None:
        """Rebuild the score series of a resumed run from the log history the Trainer restored."""
        key = LOG_PREFIX + self.tracker.score
        for entry in state.log_history:
            if key in entry and entry["step"] <= state.global_step:
                probe = HeadGradient(**{f: entry.get(LOG_PREFIX + f, float("nan")) for f in _NUMERIC}, path="")
                path = os.path.join(args.output_dir, entry.get(CHECKPOINT_KEY, f"{PREFIX_CHECKPOINT_DIR}-{entry['step']}"))
                columns = {c: entry[LOG_PREFIX + c] for c in PC_COLUMNS if LOG_PREFIX + c in entry}
                self.tracker.record(int(entry["step"]), probe, path, save=lambda p: None, columns=columns)

    # ----- measuring --------------------------------------------------------------------------------

    @staticmethod
    def _step_may_save(args, state) -> bool:
        """Whether the step about to end can be a save step (the Trainer decides in on_step_end, after
        the optimizer step, so piggyback must decide here). Exact for step saving, as the Trainer's own
        DefaultFlowCallback rule; with epoch saving any step may end an epoch, so every step is probed."""
        if args.save_strategy not in (SaveStrategy.STEPS, "steps"):
            return True
        step = state.global_step + 1
        return (state.save_steps > 0 and step % state.save_steps == 0) or step >= state.max_steps

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        # Piggyback: the captured logits came from the weights the optimizer is about to change.
        if not self.piggyback or self._capture.features is None:
            return
        if not self._step_may_save(args, state):  # the same on every rank, so collectives stay paired
            self._capture.features = self._capture.logits = None
            return
        if self._labels is None:
            raise ValfreeError("piggyback mode reads the 'labels' argument of the model call, and the training batch has none.")
        self._last = probe_capture(self._capture, self.head, self._labels, self.options)

    def _measure(self, model) -> HeadGradient | None:
        if self.piggyback:
            result, self._last = self._last, None
            return result
        return self.measurer.probe(model)

    # ----- at each save -----------------------------------------------------------------------------

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:
            self._check(args, state, control, model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        if control.should_save:
            self._check(args, state, control, model)

    def _check(self, args, state, control, model) -> None:
        if self.tracker.steps and state.global_step <= self.tracker.steps[-1]:
            return  # the epoch ended on a step that was already checked
        probe = self._measure(model)
        if probe is None:
            return
        columns = self.measurer.columns(model) if self.measurer.ready else {}
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        # The Trainer writes checkpoint-N right after this hook; the tracker only records the path.
        self.tracker.record(state.global_step, probe, os.path.join(args.output_dir, name), save=lambda p: None,
                            columns=columns)
        entry = {LOG_PREFIX + f: getattr(probe, f) for f in _NUMERIC}
        entry[LOG_PREFIX + self.tracker.score + "_ema"] = self.tracker.smoothed[-1]
        entry.update({LOG_PREFIX + c: v for c, v in columns.items()})
        values = {k: v for k, v in entry.items() if isinstance(v, (int, float)) and math.isfinite(v)}
        self._pending_log = (state.global_step, values)
        control.should_log = True  # so that on_log comes at this step, for this callback to add them
        entry[CHECKPOINT_KEY] = name
        if state.epoch is not None:
            entry["epoch"] = state.epoch
        entry["step"] = state.global_step
        state.log_history.append(entry)
        best = self.tracker.best()
        if best is not None:
            state.best_global_step, state.best_metric = best.step, best.score
        stop = agree_any(self.tracker.should_stop(), device=self.head.weight.device)
        if stop:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Only in the log of the check's own step: when the Trainer had already logged that step (an
        # epoch that ends on a logging step), the values stay in state.log_history alone.
        if self._pending_log is not None and self._pending_log[0] == state.global_step and logs is not None:
            logs.update(self._pending_log[1])
        self._pending_log = None

    def on_save(self, args, state, control, **kwargs):
        # The probe data (seeded indices or rows) and the previous predictions, next to the checkpoint,
        # so that a resumed run measures prediction changes on the same rows without a gap.
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not state.is_world_process_zero or not os.path.isdir(folder) or not self.measurer.ready:
            return
        data = self.measurer.state_dict()
        if data["data"] is not None and data["data"].get("source") != "dataset":
            data["data"] = None  # rows kept as tensors are not written as JSON; the given batch needs no saving
        tmp = os.path.join(folder, STATE_FILE + ".tmp")
        with open(tmp, "w") as fh:
            json.dump(data, fh)
        os.replace(tmp, os.path.join(folder, STATE_FILE))

    # ----- the end ----------------------------------------------------------------------------------

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self._stack.close()
        self._capture = None
        best = state.best_model_checkpoint
        if not self.load_best_at_end or best is None:
            return
        if not os.path.isdir(best):
            warnings.warn(f"LabelFreeCallback: the best checkpoint {best} no longer exists, so the final model is kept.")
            return
        # strict=False: weights tied to the embeddings are not stored twice in the saved file.
        weights = os.path.join(best, "model.safetensors")
        if not os.path.isfile(os.path.join(best, "config.json")) and os.path.isfile(weights):
            # A plain nn.Module trained by the Trainer: its folder holds the weights and no config.
            from safetensors.torch import load_file

            model.load_state_dict(load_file(weights), strict=False)
            return
        load_into(model, best, strict=False)


def _is_reporter(callback) -> bool:
    """A reporting integration: an instance of one of transformers' integration callbacks (TensorBoard,
    W&B, MLflow, ...), or of a subclass of one."""
    return any(cls.__module__.startswith("transformers.integrations") for cls in type(callback).__mro__)


def _trained_per_save(args, state, loader) -> int | None:
    """Training inputs between two saves (the Trainer's checks), over all devices; None when unknown."""
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * max(1, args.world_size)
    if args.save_strategy in (SaveStrategy.STEPS, "steps"):
        save_steps = state.save_steps or args.save_steps
        return int(save_steps * per_step) if save_steps and save_steps >= 1 else None
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None
