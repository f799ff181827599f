"""``valfree.Monitor``: label-free checkpoint selection and early stopping inside a plain PyTorch loop.

Two ways to get the score, one object to feed it to:

- **fixed batch** (the paper's protocol): every ``every`` steps the model runs once, in eval mode
  and without gradients, on the same batch, and the head gradient is taken on it;
- **piggyback**: no extra forward pass at all. A forward hook on the head keeps a reference to the
  head's input and output from the training forward; at ``step(targets=y)`` the closed-form head
  gradient is computed from them. The cost is a few (batch x classes x features) products.

Piggyback sees the *training-mode* forward: BatchNorm normalises with the batch's own statistics and
dropout is active, while the fixed-batch probe runs in eval mode. Both are legitimate signals, but
they are not the same number; the piggyback value equals ``head_gradient(model, x, y, train_mode=True)``
on the same batch (exactly, for a model without dropout). It is also measured on a different batch
every time, so it is noisier: smooth it (``ema``) accordingly.

The selection rule is ``valfree select``'s (``rule=``, default :data:`valfree.selection.rules.DEFAULT_RULE`):
at each check the Monitor also measures prediction changes and label agreement on a fixed, seeded
subset of training inputs (see :mod:`valfree.integrations.checks`), or counts them on the training
batches themselves when they carry sample indices (``step(..., sample_ids=ids, output=logits)``, or a
dict batch with an ``index``/``idx`` entry).

With no probe batch (``Monitor(model)``) the fixed data is drawn from ``train_data=`` (a map-style
Dataset or a DataLoader), else from the first batches passed as ``step(..., batch=batch)``.

Under torch.distributed every rank calls ``step`` at the same steps; the probe covers the global
batch (see :mod:`valfree.integrations.distributed`), rank 0 writes checkpoints and results, and every
rank returns the same ``should_stop()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ValfreeError
from ..probes import HeadGradient, ProbeOptions, capture_head, find_head
from ..batches import batch_size_of, input_of, move_to
from ..probes.forward import parameter_dtype
from ..selection.rules import DEFAULT_RULE
from .checks import CheckMeasurer, sample_ids_of
from .distributed import agree_any, distributed_probe_features, distributed_probe_model, rank_and_world, unwrap
from .sampling import DEFAULT_PROBE_SIZE, DEFAULT_SEED
from .tracking import DEFAULT_WARMUP, Best, ScoreTracker, needs_predictions


def checked_probe_source(who: str, how: str, probe_batch, piggyback: bool, rule: str, pred_subset: int | None) -> int | None:
    """The constructor checks the Monitor and the callbacks share: a fixed probe batch or piggyback, not
    both (``who`` and ``how`` say whom and how to pass the batch); a batch that cannot be split is one
    error now rather than at the first check. Returns the prediction subset size (0 where the rule does
    not read prediction changes and none was asked for)."""
    if piggyback and probe_batch is not None:
        raise ValfreeError(f"give {who} either probe_batch={how} or piggyback=True, not both.")
    if probe_batch is not None:
        split_probe_batch(probe_batch)
    return 0 if pred_subset is None and not needs_predictions(rule) else pred_subset


def split_probe_batch(batch) -> tuple[object, object]:
    """(inputs, targets) from ``(inputs, targets)`` or a dict holding ``labels``; targets may be 'pseudo'."""
    if isinstance(batch, dict):
        if "labels" not in batch:
            raise ValfreeError(
                "a dict probe batch needs a 'labels' entry with the targets (or pass (inputs, 'pseudo') for unlabeled data)."
            )
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return inputs, batch["labels"]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise ValfreeError(
        "probe_batch must be (inputs, targets), (inputs, 'pseudo') or a dict of model inputs with 'labels'."
    )


def probe_fixed_batch(model: nn.Module, head, inputs, targets, options: ProbeOptions, group=None) -> HeadGradient:
    """The probe of a fixed batch (each rank passes its share), moved to the head's device and the
    model's dtype. Shared by the Monitor and the Lightning and Hugging Face callbacks."""
    device = head.weight.device
    inputs = move_to(inputs, device, parameter_dtype(model))
    targets = targets if isinstance(targets, str) else move_to(targets, device)
    return distributed_probe_model(model, inputs, targets, options, group=group)


def probe_capture(capture, head, targets, options: ProbeOptions, group=None) -> HeadGradient:
    """Piggyback: the probe of the forward the head's hook captured last (over every rank's micro-batch).
    The capture is cleared, so the same forward is never probed twice."""
    features, logits = capture.features, capture.logits
    capture.features = capture.logits = None
    return distributed_probe_features(features, logits, targets, head.weight, head.bias, options, group)


class Monitor:
    """Label-free checkpoint selection and early stopping for a plain training loop.

    Zero-argument use::

        monitor = valfree.Monitor(model, checkpoint_dir="ckpt", patience=10, total_steps=len(loader) * epochs)
        for step, (x, y) in enumerate(loader, 1):
            loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
            monitor.step(step, batch=(x, y))   # the first batches give the fixed probe data
            if monitor.should_stop():
                break
        monitor.finish()                # keep exactly save_top_k files
        monitor.load_best()             # the rule's choice, back into the model

    Fixed-batch mode: ``Monitor(model, probe_batch=(x_probe, y_probe), ...)``; its inputs are also the
    prediction-change subset. Piggyback mode: ``Monitor(model, piggyback=True, every=1)``; call
    ``monitor.step(step, targets=y)`` after the training forward (before ``optimizer.step()``, so
    that the head weight that produced the logits is the one measured).

    Args:
        model: the model being trained (a DDP wrapper is looked through).
        probe_batch: the fixed batch, ``(inputs, targets)`` or a dict with ``labels``; targets may be
            ``"pseudo"`` for the model's own argmax. Under DDP pass the same batch on every rank: each
            rank probes its share and the shares are combined (``shard=False`` to probe as given).
            None (and not piggyback): drawn from ``train_data`` or the first ``step(batch=...)``.
        piggyback: probe the training forward instead of a fixed batch.
        every: probe every ``every`` calls of ``step`` (by step number when one is passed).
        head, loss, label_smoothing, ignore_index: as for :func:`valfree.head_gradient`.
        rule: the selection rule of ``valfree select --rule`` (default ``DEFAULT_RULE``).
        score, mode, tail, ema: the probe followed by the rule (see :func:`valfree.select_checkpoint`).
        checkpoint_dir, filename: where each probed step's ``state_dict`` is saved (``None``: no files).
        save_top_k: files kept after :meth:`finish` (see :mod:`valfree.integrations.tracking`); -1 keeps all.
        patience, min_delta: early stopping by the rule (None: never stop).
        warmup: no stop in the first ``warmup`` checks (a count) or share of ``total_steps`` (a fraction).
        total_steps: the run's length in steps, when known (makes a fractional warm-up exact).
        train_data: a Dataset or DataLoader to draw the fixed probe data from.
        pred_subset: training inputs in the prediction-change subset (0: none; 0 for ``rule="probe"``).
            The default, for a subset drawn from the training data, is sized by
            :func:`~valfree.integrations.prediction_tracking.training_pred_subset` so that predicting it
            costs about 1 % of the training between two checks: 2 % of the inputs trained on in
            ``every`` steps (the batch size is read from ``train_data``'s loader or the first
            ``step(batch=...)``/``targets``), between 256 and ``DEFAULT_PRED_SUBSET`` (2048); 256
            for the default ``every=100`` at batch 128. probe_size, seed: the drawn probe batch.
        results: a CSV in the format of ``valfree score``, one row per probe.
    """

    def __init__(
        self,
        model: nn.Module,
        probe_batch=None,
        *,
        piggyback: bool = False,
        every: int = 100,
        head: str | nn.Module | None = None,
        loss="ce",
        label_smoothing: float = 0.0,
        ignore_index: int = -100,
        rule: str = DEFAULT_RULE,
        score: str = "grad_norm",
        mode: str = "min",
        tail: float | int = 0.2,
        ema: float = 3,
        checkpoint_dir: str | os.PathLike | None = None,
        filename: str = "step-{step}.pt",
        save_top_k: int = 1,
        patience: int | None = None,
        min_delta: float = 0.0,
        warmup: float | int = DEFAULT_WARMUP,
        total_steps: int | None = None,
        train_data=None,
        pred_subset: int | None = None,
        probe_size: int = DEFAULT_PROBE_SIZE,
        seed: int = DEFAULT_SEED,
        results: str | os.PathLike | None = None,
        shard: bool = True,
        group=None,
    ):
        pred_subset = checked_probe_source("the Monitor", "(inputs, targets) for fixed-batch mode", probe_batch, piggyback,
                                           rule, pred_subset)
        if not isinstance(every, int) or every < 1:
            raise ValfreeError(f"every must be a positive number of steps, not {every!r}.")
        if "{step" not in filename:
            raise ValfreeError(f"filename {filename!r} must contain '{{step}}' so that checkpoints do not overwrite each other.")
        self.model = unwrap(model)
        self.piggyback, self.every, self.group = piggyback, every, group
        self.rank, self.world = rank_and_world(group)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.filename = filename
        expected = total_steps // every if total_steps else None
        self.tracker = ScoreTracker(score, mode, tail, ema, save_top_k, patience, min_delta, results,
                                    writer=self.rank == 0, rule=rule, warmup=warmup, expected_checks=expected)
        options = ProbeOptions(head, loss, label_smoothing, ignore_index)
        self.measurer = CheckMeasurer(probe_batch, options=options, pred_subset=pred_subset, probe_size=probe_size,
                                      seed=seed, shard=shard, group=group)
        # The default subset is sized once the batch size is known; the fixed data is drawn from
        # train_data at the first step, after a load_state_dict that restores the saved draw.
        self._sized = pred_subset is not None or probe_batch is not None
        self._loader = None
        if train_data is not None:
            self._loader = train_data if hasattr(train_data, "dataset") else _AsLoader(train_data)
            self._size_subset(getattr(self._loader, "batch_size", None))
        self.last: HeadGradient | None = None
        self.last_columns: dict = {}
        self._calls = 0
        self._stack = contextlib.ExitStack()
        self._capture = None
        if piggyback:
            self.head = find_head(self.model, head)
            self.probe_options = dataclasses.replace(options, head=self.head.module)
            self._capture = self._stack.enter_context(capture_head(self.head))
        elif probe_batch is not None:
            self.measurer.prepare(self.model)
            self.head, self.probe_options = self.measurer.head, self.measurer.options
        else:
            self.head, self.probe_options = None, options

    @property
    def mode(self) -> str:
        """'piggyback' or 'fixed'."""
        return "piggyback" if self.piggyback else "fixed"

    # ----- the loop ---------------------------------------------------------------------------------

    def step(self, step: int | None = None, targets=None, *, batch=None, sample_ids=None, output=None) -> HeadGradient | None:
        """Call once per training step. Probes, records, saves and prunes checkpoints every ``every`` steps.

        ``step`` defaults to a count of calls. ``targets`` are the step's labels (piggyback mode only;
        ``"pseudo"`` for the model's argmax). ``batch`` is the step's training batch: the first ones
        give the fixed probe data when none was passed, and a dict batch's ``index``/``idx`` entry
        gives the sample indices. With ``sample_ids`` (and ``output``, the training forward's logits,
        or in piggyback mode the head's captured output) prediction changes are counted on the
        training batches themselves, with no extra forward pass. Returns the probe result on probing
        steps, else None.
        """
        self._calls += 1
        step = self._calls if step is None else int(step)
        if not self._sized:
            self._size_subset(_rows_of(batch, targets))
        self._draw()
        if batch is not None:
            self.measurer.offer_batch(batch)
            if sample_ids is None:
                sample_ids = sample_ids_of(batch)
        if sample_ids is not None:
            self._observe(sample_ids, output, batch, targets)
        if step % self.every:
            return None
        probe = self.probe(targets)
        columns = self.measurer.columns(self.model)
        self.last_columns = columns
        path = str(self.checkpoint_dir / self.filename.format(step=step)) if self.checkpoint_dir is not None else ""
        self.tracker.record(step, probe, path, save=self._save, remove=self._remove if self.rank == 0 else None,
                            columns=columns)
        if self.world > 1:
            # Every rank computed the same numbers; agreeing on the flag makes a missed stop impossible.
            self.tracker.stopped = agree_any(self.tracker.stopped, self.group, self.head.weight.device)
        return probe

    def _observe(self, sample_ids, output, batch, targets) -> None:
        if output is None and self._capture is not None:
            output = self._capture.logits
        if output is None:
            raise ValfreeError(
                "counting prediction changes on the training batches needs the training forward's output: "
                "pass monitor.step(step, batch=..., output=logits)."
            )
        from ..probes.batches import label_of

        labels = targets if targets is not None and not isinstance(targets, str) else (label_of(batch) if batch is not None else None)
        if labels is not None and (isinstance(labels, str) or torch.as_tensor(labels).dim() != 1):
            labels = None
        self.measurer.observe(sample_ids, output, labels)

    def _size_subset(self, rows_per_step: int | None, final: bool = False) -> None:
        """Size the default prediction subset from the rows one rank trains per step (once known, or
        ``final``: now, whatever is known)."""
        if not self._sized and (rows_per_step or final):
            trained = rows_per_step * self.every * self.world if rows_per_step else None
            self.measurer.budget_subset(trained)
            self._sized = True

    def _draw(self) -> None:
        """Draw the fixed data from ``train_data`` once the subset is sized (a resumed run redraws the
        saved indices)."""
        if self._sized and self._loader is not None:
            self.measurer.offer_loader(self._loader)
            self._loader = None

    def probe(self, targets=None) -> HeadGradient:
        """Measure now, without recording: the fixed batch, or the last training forward in piggyback mode."""
        self._size_subset(None, final=True)
        self._draw()
        if self.piggyback:
            if targets is None:
                raise ValfreeError(
                    "piggyback mode needs the step's targets: call monitor.step(step, targets=y) (or targets='pseudo')."
                )
            cap = self._capture
            if cap.features is None:
                raise ValfreeError(
                    f"the head {self.head.name!r} has not run since the last probe; call monitor.step() after the "
                    "training forward pass."
                )
            if self.measurer.buffer.count or self.measurer.given is not None:
                self.measurer.prepare(self.model)
            result = probe_capture(cap, self.head, targets, self.probe_options, self.group)
        else:
            if not self.measurer.ready and not self.measurer.buffer.count:
                raise ValfreeError(
                    "the Monitor has no probe data yet: pass probe_batch=(inputs, targets) or train_data=dataset, "
                    "or give it the training batches with monitor.step(step, batch=batch)."
                )
            self.measurer.prepare(self.model)
            self.head, self.probe_options = self.measurer.head, self.measurer.options
            result = self.measurer.probe(self.model)
        self.last = result
        return result

    def _save(self, path: str) -> None:
        if self.rank != 0:  # every rank records the path; one writes the file
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tmp = f"{path}.tmp"
        torch.save(self.model.state_dict(), tmp)
        os.replace(tmp, path)  # a crash mid-write never leaves a truncated checkpoint

    @staticmethod
    def _remove(path: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)

    # ----- answers ----------------------------------------------------------------------------------

    def best(self) -> Best | None:
        """The checkpoint the selection rule chooses from the checks so far (``best().choice`` says why)."""
        return self.tracker.best()

    def should_stop(self) -> bool:
        """True once the rule says stop, after the warm-up (same on every rank); never with ``patience=None``."""
        return self.tracker.should_stop()

    def finish(self) -> Best | None:
        """End of training: keep exactly ``save_top_k`` checkpoint files (the rule's choice first) and
        return the choice."""
        self.tracker.finish(self._remove if self.rank == 0 else None)
        return self.best()

    def load_best(self, strict: bool = True) -> Best | None:
        """Load the chosen checkpoint's weights into the model (it must have been saved: ``checkpoint_dir``)."""
        best = self.best()
        if best is None or not best.path:
            raise ValfreeError("no checkpoint file was kept for the chosen step; pass checkpoint_dir= to the Monitor.")
        state = torch.load(best.path, map_location="cpu", weights_only=True)
        self.model.load_state_dict(state, strict=strict)
        return best

    @property
    def history(self) -> tuple[list[int], list[float]]:
        """(steps, raw scores) recorded so far."""
        return list(self.tracker.steps), list(self.tracker.values)

    # ----- resume and cleanup -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"calls": self._calls, "tracker": self.tracker.state_dict(), "data": self.measurer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._calls = int(state["calls"])
        self.tracker.load_state_dict(state["tracker"])
        if state.get("data"):
            self.measurer.load_state_dict(state["data"])

    def close(self) -> None:
        """Remove the piggyback hook; the model is left as it was."""
        self._stack.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _rows_of(batch, targets) -> int | None:
    """How many samples a training step's batch (or, failing that, its targets) holds; None if unknown."""
    for value in (batch, targets):
        if value is None or isinstance(value, str):
            continue
        try:
            return batch_size_of(input_of(value) if value is batch else value)
        except ValfreeError:
            continue
    return None


class _AsLoader:
    """A map-style dataset seen as a loader (items collated by :func:`valfree.probes.batches.collate`)."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.collate_fn = None
