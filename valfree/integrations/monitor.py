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

Under torch.distributed every rank calls ``step`` at the same steps; the probe covers the global
batch (see :mod:`valfree.integrations.distributed`), rank 0 writes checkpoints and results, and every
rank returns the same ``should_stop()``.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch import nn

from ..errors import ValfreeError
from ..probes import HeadGradient, ProbeOptions, capture_head, find_head
from ..batches import move_to
from ..probes.forward import parameter_dtype
from .distributed import agree_any, distributed_probe_features, distributed_probe_model, rank_and_world, shard_batch, unwrap
from .tracking import Best, ScoreTracker


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

    Fixed-batch mode::

        monitor = valfree.Monitor(model, probe_batch=(x_probe, y_probe), every=100,
                                  checkpoint_dir="ckpt", save_top_k=3, patience=5, results="scores.csv")
        for step, (x, y) in enumerate(loader, 1):
            loss = F.cross_entropy(model(x), y); loss.backward(); opt.step(); opt.zero_grad()
            monitor.step(step)
            if monitor.should_stop():
                break
        best = monitor.best()          # step, smoothed score, checkpoint path

    Piggyback mode: ``Monitor(model, piggyback=True, every=1)``; call ``monitor.step(step, targets=y)``
    after the training forward (before ``optimizer.step()``, so that the head weight that produced the
    logits is the one measured). With gradient accumulation the last micro-batch is probed.

    Args:
        model: the model being trained (a DDP wrapper is looked through).
        probe_batch: the fixed batch, ``(inputs, targets)`` or a dict with ``labels``; targets may be
            ``"pseudo"`` for the model's own argmax. Under DDP pass the same batch on every rank: each
            rank probes its share and the shares are combined (``shard=False`` to probe as given).
        piggyback: probe the training forward instead of a fixed batch.
        every: probe every ``every`` calls of ``step`` (by step number when one is passed).
        head, loss, label_smoothing, ignore_index: as for :func:`valfree.head_gradient`.
        score, mode, tail, ema: the selection rule (see :func:`valfree.select_checkpoint`).
        checkpoint_dir, filename: where each probed step's ``state_dict`` is saved (``None``: no files).
        save_top_k: retention (see :mod:`valfree.integrations.tracking`); -1 keeps every checkpoint.
        patience, min_delta: early stopping on the smoothed score (None: never stop).
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
        score: str = "grad_norm",
        mode: str = "min",
        tail: float | int = 0.2,
        ema: float = 3,
        checkpoint_dir: str | os.PathLike | None = None,
        filename: str = "step-{step}.pt",
        save_top_k: int = 1,
        patience: int | None = None,
        min_delta: float = 0.0,
        results: str | os.PathLike | None = None,
        shard: bool = True,
        group=None,
    ):
        if piggyback == (probe_batch is not None):
            raise ValfreeError(
                "give the Monitor either probe_batch=(inputs, targets) for fixed-batch mode or piggyback=True, not both or neither."
            )
        if not isinstance(every, int) or every < 1:
            raise ValfreeError(f"every must be a positive number of steps, not {every!r}.")
        if "{step" not in filename:
            raise ValfreeError(f"filename {filename!r} must contain '{{step}}' so that checkpoints do not overwrite each other.")
        self.model = unwrap(model)
        self.head = find_head(self.model, head)
        self.piggyback, self.every, self.group = piggyback, every, group
        self.probe_options = ProbeOptions(self.head.module, loss, label_smoothing, ignore_index)
        self.rank, self.world = rank_and_world(group)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.filename = filename
        self.tracker = ScoreTracker(score, mode, tail, ema, save_top_k, patience, min_delta, results, writer=self.rank == 0)
        self.last: HeadGradient | None = None
        self._calls = 0
        self._stack = contextlib.ExitStack()
        if piggyback:
            self._capture = self._stack.enter_context(capture_head(self.head))
            self._inputs = self._targets = None
        else:
            inputs, targets = split_probe_batch(probe_batch)
            if shard:
                inputs, targets = shard_batch(inputs, self.rank, self.world), shard_batch(targets, self.rank, self.world)
            self._inputs, self._targets = inputs, targets

    @property
    def mode(self) -> str:
        """'piggyback' or 'fixed'."""
        return "piggyback" if self.piggyback else "fixed"

    # ----- the loop ---------------------------------------------------------------------------------

    def step(self, step: int | None = None, targets=None) -> HeadGradient | None:
        """Call once per training step. Probes, records, saves and prunes checkpoints every ``every`` steps.

        ``step`` defaults to a count of calls. ``targets`` are the step's labels (piggyback mode only;
        ``"pseudo"`` for the model's argmax). Returns the probe result on probing steps, else None.
        """
        self._calls += 1
        step = self._calls if step is None else int(step)
        if step % self.every:
            return None
        probe = self.probe(targets)
        path = str(self.checkpoint_dir / self.filename.format(step=step)) if self.checkpoint_dir is not None else ""
        self.tracker.record(step, probe, path, save=self._save, remove=self._remove if self.rank == 0 else None)
        if self.world > 1:
            # Every rank computed the same numbers; agreeing on the flag makes a missed stop impossible.
            self.tracker.stopped = agree_any(self.tracker.stopped, self.group, self.head.weight.device)
        return probe

    def probe(self, targets=None) -> HeadGradient:
        """Measure now, without recording: the fixed batch, or the last training forward in piggyback mode."""
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
            result = probe_capture(cap, self.head, targets, self.probe_options, self.group)
        else:
            result = probe_fixed_batch(self.model, self.head, self._inputs, self._targets, self.probe_options, self.group)
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
        """The checkpoint the selection rule (EMA, tail window, argmin) chooses from the scores so far."""
        return self.tracker.best()

    def should_stop(self) -> bool:
        """True once the smoothed score has not improved for ``patience`` probes (same on every rank)."""
        return self.tracker.should_stop()

    @property
    def history(self) -> tuple[list[int], list[float]]:
        """(steps, raw scores) recorded so far."""
        return list(self.tracker.steps), list(self.tracker.values)

    # ----- resume and cleanup -----------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"calls": self._calls, "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self._calls = int(state["calls"])
        self.tracker.load_state_dict(state["tracker"])

    def close(self) -> None:
        """Remove the piggyback hook; the model is left as it was."""
        self._stack.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
