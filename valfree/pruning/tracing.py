"""Building Torch-Pruning's dependency graph, and saying which layer is at fault when that fails.

Torch-Pruning traces the model with one forward pass on example inputs. When the forward pass fails,
or when the pruned model no longer runs (a ``view(-1, 64)`` or a ``split([32, 32])`` hard-codes a
channel count the tracer cannot see), the user needs the layer's name, not a shape error from deep
inside PyTorch. :func:`locate_failure` runs a call while recording which modules are open, and names
the innermost one (or the last one that completed, for code between modules).
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from ..batches import call_args, describe, forward, logits_of
from ..errors import ValfreeError


PRUNABLE_TYPES = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.LayerNorm)


@dataclass
class _ModuleTrail:
    open: list[str] = field(default_factory=list)  # qualified names of the modules now running
    last_closed: str | None = None
    ran: set[str] = field(default_factory=set)


@contextlib.contextmanager
def _module_trail(model: nn.Module):
    trail = _ModuleTrail()
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue  # the model itself: everything runs inside it

        def pre(_m, _args, name=name):
            trail.open.append(name)
            trail.ran.add(name)

        def post(_m, _args, _out, name=name):
            if trail.open and trail.open[-1] == name:
                trail.open.pop()
            trail.last_closed = name

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        yield trail
    finally:
        for h in handles:
            h.remove()


def locate_failure(model: nn.Module, fn: Callable[[], object], ran: set[str] | None = None
                   ) -> tuple[object, str | None, BaseException | None]:
    """Run ``fn()`` and return (result, where, error); ``where`` names the layer the error came from.

    ``ran``, if given, receives the names of the modules that ran.
    """
    with _module_trail(model) as trail:
        try:
            result = fn()
            if ran is not None:
                ran.update(trail.ran)
            return result, None, None
        except Exception as exc:  # handed back so that the caller can word it for the user
            top = type(model).__name__
            if trail.open:
                name = trail.open[-1]
                where = f"layer {name!r} ({type(model.get_submodule(name)).__name__})"
            elif trail.last_closed:
                where = f"{top}.forward, after layer {trail.last_closed!r}"
            else:
                where = f"{top}.forward"
            return None, where, exc


def check_accepts(model: nn.Module, example_inputs: torch.Tensor) -> set[str]:
    """The names of the modules that run on the calibration inputs; a ValfreeError naming the layer if one fails."""
    model.eval()
    ran: set[str] = set()
    _, where, error = locate_failure(model, lambda: _no_grad_forward(model, example_inputs), ran)
    if error is not None:
        raise ValfreeError(
            f"the model fails on the calibration inputs (shape {describe(example_inputs)}) in {where}: "
            f"{type(error).__name__}: {_first_line(error)}; check that the data matches the model."
        )
    return ran


def build_pruner(model: nn.Module, example_inputs: torch.Tensor, importance, ran: set[str], **pruner_kwargs):
    """A Torch-Pruning ``BasePruner`` (alias MetaPruner) on ``model``, or a ValfreeError naming the layer.

    ``ran`` holds the modules that run in the forward pass (from :func:`check_accepts`). Torch-Pruning
    follows the autograd graph; a layer that runs but is missing from that graph (its output went
    through ``torch.no_grad``, ``.detach()`` or NumPy) cannot have its channels pruned consistently.
    """
    import torch_pruning as tp

    pruner_class = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner  # renamed in torch-pruning 1.5
    model.eval()
    # Torch-Pruning follows grad_fn; frozen layers (requires_grad=False) would have none, so unfreeze
    # everything for the trace and restore the flags afterwards.
    frozen = [p for p in model.parameters() if not p.requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruner, where, error = locate_failure(
                model, lambda: pruner_class(model, torch_pruning_inputs(model, example_inputs), importance, **pruner_kwargs))
    finally:
        for p in frozen:
            p.requires_grad_(False)
    if error is not None:
        raise ValfreeError(
            f"Torch-Pruning cannot trace the model at {where}: {type(error).__name__}: {_first_line(error)}; "
            "exclude that layer from pruning (ignored_layers=[...], on the command line --ignore NAME)."
        )
    ignored = set(pruner.ignored_layers)
    traced = pruner.DG.module2node
    untraced = [name for name, m in model.named_modules()
                if name in ran and isinstance(m, PRUNABLE_TYPES) and m not in ignored and m not in traced]
    if untraced:
        names = ", ".join(repr(n) for n in untraced[:5]) + (" ..." if len(untraced) > 5 else "")
        raise ValfreeError(
            f"Torch-Pruning cannot trace layer {names}: it runs, but its output leaves the autograd graph "
            "(torch.no_grad, .detach(), .numpy() or a non-differentiable op in forward), so its channels cannot be "
            "pruned consistently; remove that cut from forward, or leave the layer unpruned with "
            "ignored_layers=[...] (--ignore NAME)."
        )
    unwrapped = [str(w.message) for w in caught if "nwrapped" in str(w.message)]
    for message in unwrapped:  # raw nn.Parameters used outside a layer: pruning them is guesswork
        warnings.warn(f"Torch-Pruning: {message}", stacklevel=3)
    return pruner


def check_runs(model: nn.Module, example_inputs: torch.Tensor, expected_classes: int, step: int) -> None:
    """Raise a ValfreeError naming the layer if the pruned model no longer runs or lost classes."""
    out, where, error = locate_failure(model, lambda: _no_grad_forward(model, example_inputs))
    if error is not None:
        raise ValfreeError(
            f"after pruning step {step} the model fails in {where}: {type(error).__name__}: {_first_line(error)}; "
            "Torch-Pruning could not trace a shape there (a hard-coded channel count such as view(-1, 64) or a "
            "fixed split); make it shape-agnostic or exclude that layer with ignored_layers (--ignore NAME)."
        )
    out = logits_of(out)
    if isinstance(out, torch.Tensor) and out.shape[-1] != expected_classes:
        raise ValfreeError(
            f"after pruning step {step} the model returns {out.shape[-1]} outputs instead of {expected_classes}; "
            "the head was pruned, so name it with head='...' (--head NAME)."
        )


@torch.no_grad()
def _no_grad_forward(model: nn.Module, x):
    return forward(model, x)


def torch_pruning_inputs(model: nn.Module, example_inputs):
    """``example_inputs`` as Torch-Pruning passes them on: a tensor as it is, positional inputs as a tuple
    (``model(*inputs)``), keyword inputs as a dict (``model(**inputs)``, filtered to what forward takes)."""
    args, kwargs = call_args(model, example_inputs)
    if kwargs:
        return kwargs
    return args[0] if len(args) == 1 else args


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else "no detail"
