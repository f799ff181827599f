"""``valfree.prune``: iterative structured pruning with any criterion, on Torch-Pruning.

One call scores, prunes, optionally recalibrates BatchNorm and fine-tunes, and records the model's
size after every step::

    result = valfree.prune(model, train_images, criterion="jbr", ratio=0.5, steps=10)
    result.model          # the pruned nn.Module (a copy; the input model is left as it was)
    print(result.table()) # params, MACs and, with eval_data=, accuracy per step

``ratio`` is the fraction removed: of the prunable channels (``target="channels"``, Torch-Pruning's
own schedule), or of the parameters or MACs (``target="params"`` / ``"macs"``). For the latter two
each of the ``steps`` rounds rescores the model once and then prunes in small channel increments
until that round's share of the target is reached. The classifier head keeps all its outputs.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from ..batches import forward, move_to, pad_token_id
from ..errors import ValfreeError
from ..probes import find_head
from .calibration import Calibration, calibration_from, training_batches
from .criteria import get_criterion, make_importance
from .importance import CalibratedImportance, as_logits
from .options import PruneOptions, check_arguments
from .recovery import distillation_loss, finetune, recalibrate_batchnorm
from .tracing import build_pruner, check_accepts, check_runs, torch_pruning_inputs

# For params/MACs targets: the channel schedule that the rounds walk along, in increments of 1 %.
SUBSTEP_CHANNEL_FRACTION = 0.01
MAX_CHANNEL_FRACTION = 0.95


@dataclass
class PruneStep:
    """The model after one pruning step (step 0 is the unpruned model)."""

    step: int
    stage: str  # 'unpruned', 'pruned' or 'fine-tuned'
    params: int
    macs: int
    channels: int
    accuracy: float | None = None


@dataclass
class PruneResult:
    """The pruned model and what happened to it, step by step."""

    model: nn.Module
    criterion: str
    target: str
    ratio: float
    history: list[PruneStep]
    example_inputs: Any  # one calibration input: a tensor, or a dict of keyword inputs
    calibration_samples: int
    kept_fraction: float | None = None  # JBR: share of calibration samples above the confidence threshold
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def unpruned(self) -> PruneStep:
        return self.history[0]

    @property
    def final(self) -> PruneStep:
        return self.history[-1]

    def removed(self, what: str = "params") -> float:
        """Fraction of params, MACs or channels removed in the end."""
        return 1.0 - getattr(self.final, what) / getattr(self.unpruned, what)

    def table(self) -> str:
        """A plain-text table of params, MACs, channels and accuracy per step."""
        with_acc = any(s.accuracy is not None for s in self.history)
        head = ["step", "stage", "params", "MACs", "channels", "params kept"] + (["accuracy"] if with_acc else [])
        rows = []
        base = self.unpruned.params
        for s in self.history:
            row = [str(s.step), s.stage, f"{s.params:,}", _si(s.macs), str(s.channels), f"{100 * s.params / base:.1f}%"]
            if with_acc:
                row.append("-" if s.accuracy is None else f"{100 * s.accuracy:.2f}%")
            rows.append(row)
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in [head, *rows]]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "criterion": self.criterion, "target": self.target, "ratio": self.ratio,
            "calibration_samples": self.calibration_samples, "kept_fraction": self.kept_fraction,
            "options": self.options, "history": [asdict(s) for s in self.history],
        }


def prune(
    model: nn.Module,
    data: Any,
    criterion: str | object = "jbr",
    ratio: float = 0.5,
    steps: int = 10,
    *,
    target: str = "channels",
    global_pruning: bool = False,
    confidence: float = 0.9,
    group_reduction: str = "mean",
    normalizer: str | None = "mean",
    calibration_size: int | None = 1024,
    batch_size: int = 64,
    recalibrate_bn: bool = True,
    finetune_steps: int = 0,
    finetune_loss: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    finetune_lr: float = 0.01,
    eval_data: Any = None,
    head: str | nn.Module | None = None,
    ignored_layers: list[nn.Module | str] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    inplace: bool = False,
    **pruner_options: Any,
) -> PruneResult:
    """Prune ``model`` to ``ratio`` with ``criterion`` in ``steps`` rounds; returns a :class:`PruneResult`.

    Args:
        model: a classifier returning logits of shape (batch, classes).
        data: calibration data: a tensor of inputs, ``(inputs, labels)``, a Dataset or a DataLoader.
            Label-free criteria (jbr, l1, bn_scale, fpgm, whc, random) read only the inputs.
        criterion: a name from :data:`valfree.pruning.CRITERIA` or any Torch-Pruning importance.
        ratio: fraction to remove, in (0, 1), of the ``target`` quantity.
        steps: pruning rounds; data-driven criteria rescore the model before each.
        target: 'channels' (Torch-Pruning's channel ratio), 'params' or 'macs'.
        global_pruning: rank channels across layers (True) or prune every layer by the same ratio.
        confidence: JBR keeps calibration samples whose max probability exceeds this.
        group_reduction, normalizer: how Torch-Pruning combines and scales the per-layer scores of a group.
        calibration_size, batch_size: samples drawn from ``data`` (seeded) and their batch size; the JBR
            score squares each batch's first-order loss change (batch_size=1: per-sample squares).
        recalibrate_bn: re-estimate BatchNorm running statistics on the calibration inputs after each step.
        finetune_steps: SGD steps after pruning (0: none). The default loss matches the unpruned model's
            predicted probabilities (label-free); ``finetune_loss(model, batch)`` replaces it, where
            ``batch`` is what ``data`` yields.
        eval_data: labelled data; accuracy is recorded at every step, for the report only.
        head: the classifier head (default: found by :func:`valfree.find_head`); it keeps its outputs.
        ignored_layers: more modules (or their names) that must not be pruned.
        pruner_options: passed to Torch-Pruning's ``BasePruner`` (round_to, max_pruning_ratio, ...).

    The keyword options are those of :class:`PruneOptions`; :func:`prune_with` takes them as one object.
    """
    options = PruneOptions(
        target=target, global_pruning=global_pruning, confidence=confidence, group_reduction=group_reduction,
        normalizer=normalizer, calibration_size=calibration_size, batch_size=batch_size,
        recalibrate_bn=recalibrate_bn, finetune_steps=finetune_steps, finetune_loss=finetune_loss,
        finetune_lr=finetune_lr, head=head, ignored_layers=tuple(ignored_layers or ()), device=device, seed=seed,
        inplace=inplace, pruner_options=dict(pruner_options),
    )
    return prune_with(model, data, criterion, ratio, steps, options, eval_data=eval_data)


def prune_with(model: nn.Module, data: Any, criterion: str | object, ratio: float, steps: int,
               options: PruneOptions, eval_data: Any = None) -> PruneResult:
    """:func:`prune` with its keyword options gathered in one :class:`PruneOptions`."""
    o = options
    check_arguments(ratio, steps, o.target, o.finetune_steps)
    importance, name, needs_labels = _resolve_criterion(criterion, o.confidence, o.group_reduction, o.normalizer)
    device = torch.device(o.device) if o.device is not None else _device_of(model)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(o.seed)
        if not o.inplace:
            model = copy.deepcopy(model)
        model.to(device).eval()
        teacher = copy.deepcopy(model).eval() if o.finetune_steps and o.finetune_loss is None else None
        pad = pad_token_id(model)  # token ids of unequal length are padded with the model's pad token
        calibration = calibration_from(data, batch_size=o.batch_size, max_samples=o.calibration_size, seed=o.seed,
                                       device=device, labels=needs_labels, what="calibration data", pad_token_id=pad)
        evaluation = calibration_from(eval_data, batch_size=256, max_samples=None, device=device, labels=True,
                                      what="evaluation data", pad_token_id=pad) if eval_data is not None else None
        example = calibration.example_inputs()
        head_module = find_head(model, o.head, example).module
        classes = head_module.weight.shape[0]
        ignored = [head_module, *_resolve_layers(model, o.ignored_layers)]
        ran = check_accepts(model, example)
        # Torch-Pruning rebuilds pruned weights as new nn.Parameters (trainable); refreeze them after each step.
        frozen = [(m, n) for m in model.modules() for n, p in m.named_parameters(recurse=False) if not p.requires_grad]
        if isinstance(importance, CalibratedImportance):
            importance.prepare(model, calibration)
        record = _Recorder(model, example, ignored, evaluation)
        history = [record(0, "unpruned")]
        if history[0].channels == 0:
            raise ValfreeError("nothing to prune: every convolution and linear layer is the head or ignored.")
        if o.target == "channels":  # Torch-Pruning's own schedule: one step per round
            schedule = dict(pruning_ratio=ratio, iterative_steps=steps)
        else:  # fine channel increments; each round takes as many as its share of the target needs
            schedule = dict(pruning_ratio=MAX_CHANNEL_FRACTION,
                            iterative_steps=math.ceil(MAX_CHANNEL_FRACTION / SUBSTEP_CHANNEL_FRACTION))
        pruner = build_pruner(model, example, importance, ran, global_pruning=o.global_pruning, ignored_layers=ignored,
                              **schedule, **o.pruner_options)
        measure = {"channels": None, "params": lambda: _count_params(model),
                   "macs": lambda: _count_macs(model, example)}[o.target]
        start = measure() if measure else None
        for step in range(1, steps + 1):
            if isinstance(importance, CalibratedImportance):
                importance.update(model, calibration)
            if measure is None:
                _prune_one_step(pruner, importance)
            else:
                while measure() > start * (1.0 - ratio * step / steps) and pruner.current_step < pruner.iterative_steps:
                    _prune_one_step(pruner, importance)
            for module, param_name in frozen:
                getattr(module, param_name).requires_grad_(False)
            check_runs(model, example, classes, step)
            if o.recalibrate_bn:
                recalibrate_batchnorm(model, calibration.inputs)
            history.append(record(step, "pruned"))
        model.zero_grad(set_to_none=True)  # gradient criteria leave .grad behind
        _warn_if_short(history, o.target, ratio)
        if o.finetune_steps:
            batches = training_batches(data, batch_size=o.batch_size, steps=o.finetune_steps, seed=o.seed + 1,
                                       device=device, inputs_only=o.finetune_loss is None, pad_token_id=pad)
            finetune(model, batches, o.finetune_loss or distillation_loss(teacher), lr=o.finetune_lr)
            history.append(record(steps, "fine-tuned"))
    model.eval()
    recorded = {"global_pruning": o.global_pruning, "confidence": o.confidence, "group_reduction": o.group_reduction,
                "normalizer": o.normalizer, "batch_size": o.batch_size, "recalibrate_bn": o.recalibrate_bn,
                "finetune_steps": o.finetune_steps, "seed": o.seed, "steps": steps}
    return PruneResult(model, name, o.target, ratio, history, move_to(example, "cpu"), calibration.num_samples,
                       getattr(importance, "kept_fraction", None), recorded)


def _prune_one_step(pruner, importance) -> None:
    """One Torch-Pruning step; stored per-channel state follows every pruned group."""
    for group in pruner.step(interactive=True):
        group.prune()
        if isinstance(importance, CalibratedImportance):
            importance.forget(group)


class _Recorder:
    """Measures params, MACs, prunable channels and (with labelled eval data) accuracy."""

    def __init__(self, model: nn.Module, example: torch.Tensor, ignored: list[nn.Module],
                 evaluation: Calibration | None):
        self.model, self.example, self.evaluation = model, example, evaluation
        self.ignored = set(ignored)

    def __call__(self, step: int, stage: str) -> PruneStep:
        channels = sum(_out_channels(m) for m in self.model.modules() if m not in self.ignored)
        accuracy = accuracy_of(self.model, self.evaluation) if self.evaluation is not None else None
        params, macs = _count_params(self.model), _count_macs(self.model, self.example)
        return PruneStep(step, stage, params, macs, channels, accuracy)


@torch.no_grad()
def accuracy_of(model: nn.Module, evaluation: Calibration) -> float:
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in zip(evaluation.inputs, evaluation.labels):
        correct += int((as_logits(forward(model, x)).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / total


def _out_channels(module: nn.Module) -> int:
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels
    if isinstance(module, nn.Linear):
        return module.out_features
    return 0


def _count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _count_macs(model: nn.Module, example: torch.Tensor) -> int:
    import torch_pruning as tp

    macs, _ = tp.utils.count_ops_and_params(model, torch_pruning_inputs(model, example))
    return int(macs)


def _resolve_criterion(criterion, confidence, group_reduction, normalizer):
    if isinstance(criterion, str):
        spec = get_criterion(criterion)
        importance = make_importance(spec.name, confidence=confidence, group_reduction=group_reduction,
                                     normalizer=normalizer)
        return importance, spec.name, spec.uses_labels
    if not callable(criterion):
        raise ValfreeError(f"criterion must be a name or a Torch-Pruning importance, not a {type(criterion).__name__}.")
    return criterion, type(criterion).__name__, bool(getattr(criterion, "requires_labels", False))


def _resolve_layers(model: nn.Module, layers) -> list[nn.Module]:
    resolved = []
    for layer in layers or []:
        if isinstance(layer, nn.Module):
            resolved.append(layer)
            continue
        try:
            resolved.append(model.get_submodule(layer))
        except AttributeError:
            raise ValfreeError(f"the model has no layer named {layer!r} to leave unpruned.") from None
    return resolved


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def _warn_if_short(history: list[PruneStep], target: str, ratio: float) -> None:
    removed = 1.0 - getattr(history[-1], target) / getattr(history[0], target)
    # Channel ratios are per group and rounded down per layer, so allow a few points below the target.
    if removed < ratio - 0.05:
        warnings.warn(f"pruning removed {100 * removed:.1f}% of {target}, short of the {100 * ratio:.0f}% asked for: "
                      "some layers could not lose more channels (Torch-Pruning leaves groups it cannot split "
                      "evenly, such as fixed-size torch.split outputs, unpruned).", stacklevel=3)


def _si(n: int) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
