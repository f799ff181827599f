"""Finding the classifier head and capturing its input and output without touching the model."""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..batches import forward, logits_of
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


def find_head(model: nn.Module, head: str | nn.Module | None = None, inputs=None) -> Head:
    """Find the classifier head of ``model``.

    With ``head`` given (a qualified module name such as ``"heads.head"``, or the module itself) that
    module is used. Otherwise, with ``inputs`` (a batch in any form :func:`valfree.batches.forward`
    takes: a tensor, a tuple, or a dict of keyword inputs), one forward pass is traced
    (:func:`traced_heads`): the head is the ``nn.Linear`` or 1x1 convolution whose output becomes the
    model's output (its ``logits`` entry, or its first tensor) through shape-only operations. The
    answer is remembered for this model object and this form of inputs, so probing the same model
    again costs no extra forward pass.

    Without ``inputs``, or when tracing finds no such layer (the output is rescaled, or mixed with
    other activations after the head), the head is found by name: a module named like a classifier
    (``fc``, ``head``, ``classifier``, ``heads.head``, ``score``, ``lm_head``), its last linear layer
    if it is a container; layers inside numbered blocks (``blocks.0.fc``) do not count. Failing that,
    the last ``nn.Linear`` or 1x1 convolution that the model registers. Several equally plausible
    names raise a :class:`ValfreeError` that lists them with the last registered linear layer and
    says to pass ``head="name"`` or a probe batch.
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
    if inputs is None or len(candidates) == 1:  # a single candidate needs no forward pass
        return _head_by_name(model, candidates)
    form = _input_form(inputs)
    remembered = _REMEMBERED.get(model, {}).get(form)
    if remembered in candidates:
        return Head(remembered, model.get_submodule(remembered))
    try:
        traced = traced_heads(model, inputs)
    except Exception:  # a model that cannot run traced (or these inputs) is found by name; a real
        return _head_by_name(model, candidates)  # input error surfaces again in the probe's own forward
    if traced:
        found = Head(_break_tie(traced), model.get_submodule(_break_tie(traced)))
    else:
        found = _head_by_name(
            model, candidates,
            "no linear layer's output becomes the model's output through shape-only operations in a traced "
            "forward pass, and by name: ",
        )
    _REMEMBERED.setdefault(model, {})[form] = found.name
    return found


# Traced heads per model object and form of inputs: a model's head does not change with its weights.
_REMEMBERED: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _input_form(inputs) -> tuple:
    if isinstance(inputs, torch.Tensor):
        return ("tensor", inputs.dim())
    if isinstance(inputs, Mapping):
        return ("mapping",) + tuple(sorted(str(k) for k in inputs))
    if isinstance(inputs, (tuple, list)):
        return ("sequence",) + tuple(_input_form(v) for v in inputs)
    return (type(inputs).__name__,)


def _break_tie(names: list[str]) -> str:
    """Names only break ties: a common head name first, then the last layer called."""
    common = [n for n in names if n.rsplit(".", 1)[-1] in COMMON_HEAD_NAMES]
    return (common or names)[-1]


def _head_by_name(model: nn.Module, candidates: list[str], why: str = "") -> Head:
    # Top-level names ("fc", "classifier.1"'s parent "classifier") win over the same word deeper inside;
    # a word inside numbered blocks ("blocks.0.fc", "layers.3.mlp.fc") names a block's layer, not the head.
    named = _named_heads(model, lambda name: name in COMMON_HEAD_NAMES)
    if not named:
        named = _named_heads(
            model,
            lambda name: name.rsplit(".", 1)[-1] in COMMON_HEAD_NAMES and not any(p.isdigit() for p in name.split(".")[:-1]),
        )
    if len(named) == 1:
        return Head(named[0], model.get_submodule(named[0]))
    if len(named) > 1:
        last = candidates[-1]
        also = "" if any(last == n or last.startswith(n + ".") for n in named) else (
            f"; the last linear layer the model registers is {last!r}"
        )
        raise ValfreeError(
            f"{why}several modules look like the classifier head ({_fmt(named)}){also}; choose one with "
            "head='name' (on the command line: --head name), or give find_head a probe batch (inputs=...) "
            "so that it traces which one produces the output."
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


# Operations that only move, select or re-type the entries of their first argument, so that the
# result still holds the head's outputs unchanged (indexing picks locations, e.g. the last token).
_SHAPE_OPS = frozenset({
    "view", "view_as", "reshape", "reshape_as", "flatten", "unflatten", "squeeze", "squeeze_", "unsqueeze",
    "unsqueeze_", "permute", "transpose", "transpose_", "swapaxes", "swapdims", "t", "t_", "movedim",
    "moveaxis", "contiguous", "clone", "detach", "select", "narrow", "__getitem__", "index_select",
    "gather", "take_along_dim", "split", "split_with_sizes", "chunk", "unbind", "tensor_split", "to",
    "float", "double", "half", "bfloat16", "type", "type_as", "cpu", "cuda", "requires_grad_",
    "T", "mT", "data",
})
# Operations that join several tensors: shape-only when every part comes from the same head.
_JOIN_OPS = frozenset({"cat", "concat", "concatenate", "stack", "hstack", "vstack"})
# Adding a constant (a parameter, a buffer or a number, e.g. a separate bias) leaves dL/dlogits, and so
# the head's gradient, unchanged.
_ADD_OPS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__isub__"})


def _op_name(func) -> str:
    name = getattr(func, "__name__", "")
    if name == "__get__":  # a property such as Tensor.T
        name = getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class _Provenance(TorchFunctionMode):
    """Follows which candidate head each tensor of a forward pass comes from, through shape-only
    operations. Tensors are held by weak reference only, so tracing keeps no activation alive."""

    def __init__(self, constants: set[int]):
        super().__init__()
        self.constants = constants  # storages of the model's parameters and buffers
        self.tags: dict[int, tuple[weakref.ref, str]] = {}

    def tag(self, tensor, name: str) -> None:
        if isinstance(tensor, torch.Tensor):
            self.tags[id(tensor)] = (weakref.ref(tensor), name)
        elif isinstance(tensor, (tuple, list)):
            for t in tensor:
                self.tag(t, name)

    def source(self, tensor) -> str | None:
        entry = self.tags.get(id(tensor)) if isinstance(tensor, torch.Tensor) else None
        return entry[1] if entry is not None and entry[0]() is tensor else None

    def _constant(self, value) -> bool:
        if isinstance(value, (int, float, bool)):
            return True
        return isinstance(value, torch.Tensor) and _storage_ptr(value) in self.constants

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        try:
            self._follow(_op_name(func), args, kwargs, out)
        except Exception:  # tracing is best effort and must never break the model's forward
            pass
        return out

    def _follow(self, name: str, args, kwargs, out) -> None:
        first = args[0] if args else None
        source = None
        if name in _SHAPE_OPS:
            source = self.source(first)
        elif name in _JOIN_OPS:
            parts = first if isinstance(first, (tuple, list)) else kwargs.get("tensors", ())
            sources = {self.source(p) for p in parts}
            source = sources.pop() if len(sources) == 1 else None
        elif name in _ADD_OPS and len(args) + len(kwargs) >= 2:
            other = args[1] if len(args) > 1 else kwargs.get("other")
            a, b = self.source(first), self.source(other)
            if a is not None and b is None and self._constant(other):
                source = a
            elif b is not None and a is None and self._constant(first):
                source = b
        if source is not None:
            self.tag(out, source)
            return
        # Any other operation that changes a traced tensor in place makes it something else.
        for arg in args:
            if arg is out and self.source(arg) is not None:
                del self.tags[id(arg)]


def _storage_ptr(tensor: torch.Tensor) -> int:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage (meta, functional wrappers)
        return 0


def traced_heads(model: nn.Module, inputs) -> list[str]:
    """Names of the linear-head-shaped modules whose output becomes the model's output, from one
    forward pass on ``inputs`` (in eval mode, under ``torch.no_grad()``; the mode is restored and the
    hooks removed).

    Forward hooks mark each candidate's output; a :class:`~torch.overrides.TorchFunctionMode` carries
    the mark through shape-only operations (view, reshape, flatten, squeeze, permute, transpose,
    contiguous, indexing, split, dtype casts), through joins of one module's outputs (``cat``,
    ``stack``) and through adding a constant such as a separate bias. When the output holds no mark
    (a view made where Python cannot see it), a candidate output that is still alive and shares the
    output's storage counts. Usually one name; empty when the output is not a head's output unchanged.
    A head applied twice is found all the same (the probe then refuses it: its gradient sums over the
    calls).
    """
    modules = [(name, m) for name, m in model.named_modules() if name and is_linear_head(m)]
    constants = {_storage_ptr(t) for t in list(model.parameters()) + list(model.buffers())} - {0}
    mode = _Provenance(constants)
    calls: list[tuple[str, weakref.ref, int]] = []  # (name, output, its storage), in call order

    def hook_for(name):
        def hook(module, args, output):
            mode.tag(output, name)
            if isinstance(output, torch.Tensor):
                calls.append((name, weakref.ref(output), _storage_ptr(output)))
        return hook

    handles = [m.register_forward_hook(hook_for(name)) for name, m in modules]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), mode:
            output = forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    y = logits_of(output)
    if y is None:
        return []
    source = mode.source(y)
    if source is not None:
        return [source]
    ptr = _storage_ptr(y)
    found: list[str] = []
    for name, ref, storage in calls:
        if ref() is not None and ptr and storage == ptr and name not in found:
            found.append(name)
    return found


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
