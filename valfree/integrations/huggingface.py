"""A Hugging Face ``TrainerCallback`` that keeps and loads the best checkpoint by the head-gradient
probe, and can stop training, with ``eval_strategy="no"``.

At every save (``save_strategy="steps"`` or ``"epoch"``) the callback probes its fixed batch (or takes
the value piggybacked on the training step), and before the Trainer writes ``checkpoint-N/``:

- appends the probe to ``state.log_history`` (keys ``valfree/<field>``, plus ``valfree/checkpoint``),
  so it is stored in each ``checkpoint-N/trainer_state.json`` and ``valfree select OUTPUT_DIR`` can
  read a finished run;
- sets ``state.best_global_step`` and ``state.best_metric`` to the selection rule's choice, from which
  the Trainer sets ``state.best_model_checkpoint`` (and protects it from ``save_total_limit``);
- sets ``control.should_training_stop`` when the early-stopping rule fires.

The Trainer loads the best model only with ``load_best_model_at_end``, which demands an evaluation at
every save; so this callback loads ``state.best_model_checkpoint`` itself in ``on_train_end``.

On resume the score series is rebuilt from ``state.log_history``, which the Trainer restores from
``trainer_state.json``; nothing else needs saving. Under DDP every rank probes its share of the fixed
batch (or its own micro-batch) and the probe covers the global batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import warnings
from dataclasses import fields


from ..errors import ValfreeError
from ..io.checkpoints import load_into
from ..io.results import ResultsStore
from ..probes import HeadGradient, ProbeOptions, capture_head, find_head
from .distributed import agree_any, shard_batch
from .monitor import probe_capture, probe_fixed_batch, split_probe_batch
from .tracking import ScoreTracker

try:
    from transformers import TrainerCallback
    from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, SaveStrategy
except ImportError:  # pragma: no cover - exercised only without the extra
    raise ImportError("valfree.huggingface needs transformers: pip install 'valfree[huggingface]'.") from None

__all__ = ["LOG_PREFIX", "LabelFreeCallback"]

LOG_PREFIX = "valfree/"
CHECKPOINT_KEY = LOG_PREFIX + "checkpoint"
_NUMERIC = tuple(f.name for f in fields(HeadGradient) if f.name not in ("path", "warnings"))


class LabelFreeCallback(TrainerCallback):
    """Label-free best-checkpoint tracking, loading and early stopping for ``transformers.Trainer``.

    Args:
        probe_batch: the fixed batch: a dict of model inputs with ``labels`` (``"pseudo"`` for the
            model's own argmax), or ``(inputs, targets)``. Same batch on every rank under DDP.
        piggyback: use the training step's own forward instead (no extra forward pass); the labels are
            read from the ``labels`` argument of the model call, the logits from the head's output,
            before the optimizer step.
        score, mode, tail, ema: the selection rule of :func:`valfree.select_checkpoint` (the default is
            the paper's universal preset, as for ``valfree select``).
        patience, min_delta: early stopping on the smoothed score (None: never stop).
        head, loss, label_smoothing, ignore_index: as for :func:`valfree.head_gradient`.
        load_best_at_end: load ``state.best_model_checkpoint`` into the model when training ends.
        results: optional CSV in the format of ``valfree score`` (written by the main process).
    """

    def __init__(
        self,
        probe_batch=None,
        *,
        piggyback: bool = False,
        score: str = "grad_norm",
        mode: str = "min",
        tail: float | int = 0.2,
        ema: float = 3,
        patience: int | None = None,
        min_delta: float = 0.0,
        head=None,
        loss="ce",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        load_best_at_end: bool = True,
        results: str | os.PathLike | None = None,
    ):
        if piggyback == (probe_batch is not None):
            raise ValfreeError(
                "give LabelFreeCallback either probe_batch (a dict of inputs with 'labels') or piggyback=True, not both or neither."
            )
        self.batch = split_probe_batch(probe_batch) if probe_batch is not None else None
        self.piggyback, self.load_best_at_end = piggyback, load_best_at_end
        self.requested = self.options = ProbeOptions(head, loss, label_smoothing, ignore_index)
        # The Trainer rotates checkpoints itself (save_total_limit), so the tracker keeps every path.
        self.tracker_args = dict(score=score, mode=mode, tail=tail, ema=ema, save_top_k=-1, patience=patience,
                                 min_delta=min_delta, results=results)
        self.tracker = ScoreTracker(**self.tracker_args)
        self.head = None
        self._stack = contextlib.ExitStack()
        self._capture = None
        self._labels = None
        self._last: HeadGradient | None = None

    # ----- setup ------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if args.save_strategy in (SaveStrategy.NO, "no"):
            raise ValfreeError(
                "LabelFreeCallback probes at each save, but save_strategy is 'no'; set save_strategy='steps' (with save_steps) or 'epoch'."
            )
        if args.metric_for_best_model is not None or args.load_best_model_at_end:
            raise ValfreeError(
                "the Trainer is also tracking its own best model (metric_for_best_model / load_best_model_at_end); "
                "unset both, since LabelFreeCallback records and loads the best checkpoint itself."
            )
        self.head = find_head(model, self.requested.head)
        self.options = dataclasses.replace(self.requested, head=self.head.module)  # found once, not at every probe
        self.tracker = ScoreTracker(**{**self.tracker_args, "results": None})
        self._replay(args, state)  # before the results file is attached: replayed rows are already in it
        if self.tracker_args["results"] is not None and state.is_world_process_zero:
            self.tracker.results = ResultsStore(self.tracker_args["results"])
        if self.batch is not None:
            inputs, targets = self.batch
            self.shard = shard_batch(inputs, args.process_index, args.world_size), shard_batch(targets, args.process_index, args.world_size)
        elif self._capture is None:
            self._capture = self._stack.enter_context(capture_head(self.head))
            handle = model.register_forward_pre_hook(self._grab_labels, with_kwargs=True)
            self._stack.callback(handle.remove)

    def _grab_labels(self, module, args, kwargs):
        self._labels = kwargs.get("labels")

    def _replay(self, args, state) -> None:
        """Rebuild the score series of a resumed run from the log history the Trainer restored."""
        key = LOG_PREFIX + self.tracker.score
        for entry in state.log_history:
            if key in entry and entry["step"] <= state.global_step:
                probe = HeadGradient(**{f: entry.get(LOG_PREFIX + f, float("nan")) for f in _NUMERIC}, path="")
                path = os.path.join(args.output_dir, entry.get(CHECKPOINT_KEY, f"{PREFIX_CHECKPOINT_DIR}-{entry['step']}"))
                self.tracker.record(int(entry["step"]), probe, path, save=lambda p: None)

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
        return probe_fixed_batch(model, self.head, *self.shard, self.options)

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
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        # The Trainer writes checkpoint-N right after this hook; the tracker only records the path.
        self.tracker.record(state.global_step, probe, os.path.join(args.output_dir, name), save=lambda p: None)
        entry = {LOG_PREFIX + f: getattr(probe, f) for f in _NUMERIC}
        entry[LOG_PREFIX + self.tracker.score + "_ema"] = self.tracker.smoothed[-1]
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
        load_into(model, best, strict=False)
