"""Finding the classifier head and capturing its input and output without touching the model."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ValfreeError

# Attribute names that libraries commonly give the final classifier (timm, torchvision-style, HF).
COMMON_HEAD_NAMES = ("fc", "head", "classifier", "heads.head", "score", "lm_head")


@dataclass(frozen=True)
class Head:
    """The classifier head: its qualified name in the model and the module itself."""

    name: str
    module: nn.Module

    @property
    def weight(self) -> torch.Tensor:
        return self.module.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.module, "bias", None)


def is_linear_head(module: nn.Module) -> bool:
    """True for modules that are a per-location linear map: ``nn.Linear`` or a 1x1 convolution (groups=1)."""
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return all(k == 1 for k in module.kernel_size) and module.groups == 1 and all(
            s == 1 for s in module.stride
        )
    return False


SUPPORTED_HEADS = (
    "supported heads are per-location linear maps: nn.Linear (over features, tokens or pixels) or a "
    "1x1 convolution with stride 1 and groups=1"
)


def not_linear_reason(module: nn.Module) -> str:
    """Why ``module`` is not a per-location linear head, as the middle of a sentence."""
    kind = type(module).__name__
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return (
            f"is a {kind} with kernel_size {tuple(module.kernel_size)}, stride {tuple(module.stride)} and "
            f"groups={module.groups}, not a per-location linear map"
        )
    return f"is a {kind}, not a per-location linear map"


def linear_candidates(model: nn.Module) -> list[str]:
    """Qualified names of every linear-head-shaped module, in registration order."""
    return [name for name, m in model.named_modules() if name and is_linear_head(m)]


def _last_linear_inside(model: nn.Module, name: str) -> str | None:
    module = model.get_submodule(name)
    if is_linear_head(module):
        return name
    inner = [n for n, m in module.named_modules() if n and is_linear_head(m)]
    return f"{name}.{inner[-1]}" if inner else None


def find_head(model: nn.Module, head: str | nn.Module | None = None) -> Head:
    """Find the classifier head of ``model``.

    With ``head`` given (a qualified module name such as ``"heads.head"``, or the module itself) that
    module is used. Otherwise a module whose name is one of the common head names (``fc``, ``head``,
    ``classifier``, ``heads.head``, ``score``, ``lm_head``...) is taken; if the named module is a
    container, its last linear layer. Failing that, the last ``nn.Linear`` or 1x1 convolution that the
    model registers. Several equally plausible candidates raise a :class:`ValfreeError` that lists
    them and says to pass ``head="name"``.
    """
    if isinstance(head, nn.Module):
        for name, m in model.named_modules():
            if m is head:
                if not is_linear_head(m):
                    raise ValfreeError(f"module {name!r} {not_linear_reason(m)}; {SUPPORTED_HEADS}.")
                return Head(name, m)
        raise ValfreeError("the module passed as head= is not a submodule of the model; pass its name instead.")
    candidates = linear_candidates(model)
    if head is not None:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            raise ValfreeError(
                f"the model has no module named {head!r}; linear layers it does have: {_fmt(candidates)}."
            ) from None
        resolved = _last_linear_inside(model, head)
        if resolved is None:
            raise ValfreeError(
                f"module {head!r} {not_linear_reason(module)}; {SUPPORTED_HEADS}; "
                f"linear layers in the model: {_fmt(candidates)}."
            )
        return Head(resolved, model.get_submodule(resolved))
    if not candidates:
        raise ValfreeError(
            f"{type(model).__name__} has no nn.Linear or 1x1 convolution to use as the head; "
            "pass head='name' with the module that produces the logits."
        )
    # Top-level names ("fc", "classifier.1"'s parent "classifier") win over the same word deeper inside.
    named = _named_heads(model, lambda name: name in COMMON_HEAD_NAMES)
    if not named:
        named = _named_heads(model, lambda name: name.rsplit(".", 1)[-1] in COMMON_HEAD_NAMES)
    if len(named) == 1:
        return Head(named[0], model.get_submodule(named[0]))
    if len(named) > 1:
        raise ValfreeError(
            f"several modules look like the classifier head ({_fmt(named)}); choose one with head='name' "
            "(on the command line: --head name)."
        )
    return Head(candidates[-1], model.get_submodule(candidates[-1]))


def _named_heads(model: nn.Module, matches) -> list[str]:
    named: list[str] = []
    for name, _ in model.named_modules():
        if name and matches(name):
            resolved = _last_linear_inside(model, name)
            # A container named "head" that holds "head.fc" must count once.
            if resolved is not None and not any(resolved == r or resolved.startswith(r + ".") for r in named):
                named = [r for r in named if not r.startswith(name + ".")] + [resolved]
    return named


def _fmt(names: list[str]) -> str:
    if not names:
        return "none"
    shown = ", ".join(repr(n) for n in names[-8:])
    return shown if len(names) <= 8 else f"... {shown}"


@dataclass
class HeadCapture:
    """Input and output of the head from the last forward pass, detached."""

    features: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    calls: int = 0  # forward calls seen; a head applied twice (e.g. to several feature levels) keeps the last


@contextlib.contextmanager
def capture_head(head: Head, detach: bool = True):
    """Record the head's input (features) and output (logits) during forward passes.

    A forward hook is registered on the head and removed on exit, so the model is left exactly as it
    was. With ``detach=True`` the captured tensors are cut from the graph, which is what makes the
    probe a head-only quantity.
    """
    capture = HeadCapture()

    def hook(module, args, output):
        x = args[0] if args else None
        if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
            return
        capture.calls += 1
        capture.features = x.detach() if detach else x
        capture.logits = output.detach() if detach else output

    handle = head.module.register_forward_hook(hook)
    try:
        yield capture
    finally:
        handle.remove()
