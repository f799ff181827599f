"""Saving a pruned model so that it loads without its factory and without unpickling.

A pruned model no longer fits the class that built it (every layer has new widths), and Torch-Pruning's
own ``tp.state_dict`` needs that class and full unpickling to load. ``torch.export`` captures the
computation itself as a graph of ATen operators, but ``torch.export.load`` unpickles weights, example
inputs and custom objects, and its file may carry Python guard code; its documentation says never to
load it from an untrusted source.

So valfree writes one ``.safetensors`` file:

* tensors: the exported program's parameters, buffers and tensor constants;
* metadata: the exported graph in torch.export's JSON schema, without weights, example inputs, node
  metadata or guard code, plus valfree's record of the pruning (criterion, ratio, history).

:func:`load_pruned` reads the tensors with safetensors (no pickle) and the graph with ``json``, then
checks the graph before handing it to torch.export's deserializer: every operator must be an ATen
operator (or ``operator.getitem``) and every symbolic size expression must be plain sympy arithmetic,
since the deserializer evaluates those strings. Node metadata and guard code are dropped unread.
"""

from __future__ import annotations

import inspect
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..batches import call_args, logits_of, map_tensors
from ..errors import ValfreeError

FORMAT = "valfree-pruned"
FORMAT_VERSION = "1"
_STATE = "state::"
_CONSTANT = "constant::"
_ALLOWED_CALL_TARGETS = re.compile(r"^(torch\.ops\.aten\.[A-Za-z0-9_]+\.[A-Za-z0-9_]+|_operator\.getitem)$")
# ATen operators that reach outside the tensors they are given.
_DENIED_ATEN = ("from_file", "_print", "save", "load")
# sympy's srepr of symbolic sizes: Symbol('s77', positive=True, integer=True), Mul(Integer(2), ...), ...
_SYMPY_NAMES = {
    "Symbol", "Integer", "Rational", "Add", "Mul", "Pow", "Mod", "Max", "Min", "Abs", "True", "False",
    "positive", "integer", "nonnegative", "negative", "real", "finite", "zero", "nonzero", "FloorDiv",
    "ModularIndexing", "Where", "PythonMod", "CleanDiv", "CeilToInt", "FloorToInt", "CeilDiv", "LShift",
    "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat", "TruncToInt",
    "RoundToInt", "RoundDecimal", "ToFloat", "Identity",
}
_EXPR_TOKEN = re.compile(r"\s*(?:(?P<name>[A-Za-z]\w*)|(?P<quoted>'[a-z]+\d*')|(?P<number>\d+)|(?P<punct>[()+\-*/,=]))")


def save_pruned(model: nn.Module, path: str | os.PathLike, example_inputs, info: dict[str, Any] | None = None,
                dynamic_batch: bool = True) -> Path:
    """Export ``model`` (eval mode) with ``example_inputs`` and write it to ``path`` as described above.

    ``example_inputs`` is one calibration input in the form the model takes (see
    :mod:`valfree.batches`): a tensor, a tuple of positional inputs, or a dict of keyword inputs
    (``input_ids``, ``attention_mask``, ... as a Hugging Face model takes them). The loaded module is
    called the same way: ``loaded(x)``, or ``loaded(input_ids=..., attention_mask=...)``.

    The batch dimension stays dynamic unless ``dynamic_batch=False``; so does the sequence length of
    integer keyword inputs (token ids, masks), up to what the model allows (its position embeddings).
    A model whose output is not made of plain tensors, tuples, lists and dicts (a Hugging Face
    ``ModelOutput``) is saved returning its logits, so that loading needs no class of its library.
    ``info`` (JSON-serialisable) is stored alongside and comes back from :func:`read_pruned_info`.
    """
    from torch._export.serde.serialize import ExportedProgramSerializer, _to_json_bytes

    path = Path(path)
    model = model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    # Two samples: a batch of one would be specialised to a constant.
    args, kwargs = call_args(model, map_tensors(lambda t: _two_rows(t).to(device).contiguous(), example_inputs))
    module, dynamic = _exportable(model, args, kwargs, dynamic_batch)
    try:
        program = torch.export.export(module, args, kwargs, dynamic_shapes=dynamic)
    except Exception as exc:
        raise ValfreeError(f"torch.export cannot capture the pruned model ({type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0][:300]}), so it cannot be saved factory-free; "
                           "its forward must stay in torch operations (no NumPy, .item() or Python branches "
                           "on tensor values).") from None
    serialized = ExportedProgramSerializer().serialize(
        program, serialize_state_dict=False, serialize_constants=False, serialize_example_inputs=False)
    graph = json.loads(_to_json_bytes(serialized.exported_program))
    graph["guards_code"] = []
    for node in graph["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    problem = _check_graph(graph)
    if problem:
        raise ValfreeError(f"the exported graph uses {problem}, which valfree's loader refuses; it cannot be saved.")
    tensors: dict[str, torch.Tensor] = {}
    for name, value in program.state_dict.items():
        tensors[_STATE + name] = value.detach().cpu().contiguous().clone()
    for name, value in program.constants.items():
        if not isinstance(value, torch.Tensor):
            raise ValfreeError(f"the exported model holds a non-tensor constant {name!r} ({type(value).__name__}); "
                               "only tensors can be stored without pickle.")
        tensors[_CONSTANT + name] = value.detach().cpu().contiguous().clone()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "torch_version": torch.__version__,
        "program": json.dumps(graph, separators=(",", ":")),
        "input_shape": json.dumps(_shapes(example_inputs)),
        "info": json.dumps(info or {}, default=str),
    }
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _exportable(model: nn.Module, args: tuple, kwargs: dict, dynamic_batch: bool):
    """The module to export and its dynamic shapes, in the form torch.export takes them."""
    with torch.no_grad():
        plain = _is_plain(model(*args, **kwargs))
    names = list(kwargs) or [f"input_{i}" for i in range(len(args))]
    # torch.export matches keyword inputs (and their dynamic shapes) to forward's named parameters.
    module = model if plain and _names_parameters(model, list(kwargs)) else _wrapper(model, names, logits=not plain)
    if not dynamic_batch:
        return module, None
    if kwargs:
        auto = torch.export.Dim.AUTO
        # AUTO: dynamic where the model allows it, specialised without an error where it does not (a
        # sequence cannot outgrow the position embeddings, and the saved range says so).
        return module, {k: ({0: auto, 1: auto} if _is_tokens(v) else {0: auto})
                        if isinstance(v, torch.Tensor) and v.dim() else None for k, v in kwargs.items()}
    batch = torch.export.Dim("batch", min=1)
    return module, tuple({0: batch} if isinstance(a, torch.Tensor) and a.dim() else None for a in args)


def _names_parameters(model: nn.Module, names: list[str]) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    return all(n in parameters and parameters[n].kind is not inspect.Parameter.VAR_KEYWORD for n in names)


def _wrapper(model: nn.Module, names: list[str], logits: bool) -> nn.Module:
    """``model`` behind a forward that names its inputs, returning only the logits when ``logits``."""

    def forward(self, *args, **kwargs):
        output = self.model(*args, **kwargs)
        return logits_of(output) if logits else output

    parameter = inspect.Parameter.POSITIONAL_OR_KEYWORD
    forward.__signature__ = inspect.Signature([inspect.Parameter(n, parameter) for n in ["self", *names]])
    module = type("PrunedModel", (nn.Module,), {"forward": forward})()
    module.model = model
    return module.eval()


def _is_tokens(value: torch.Tensor) -> bool:
    """Token ids, masks and type ids: (batch, length) integers, whose length varies between batches."""
    return value.dim() == 2 and not value.is_floating_point() and not value.is_complex()


def _is_plain(output) -> bool:
    """Whether torch.export can describe ``output`` with builtin containers only (no library class)."""
    if isinstance(output, torch.Tensor) or output is None:
        return True
    if type(output) in (tuple, list):
        return all(_is_plain(v) for v in output)
    if type(output) is dict:
        return all(_is_plain(v) for v in output.values())
    return False


def _two_rows(t: torch.Tensor) -> torch.Tensor:
    if not t.dim():
        return t
    return t[:2] if len(t) >= 2 else t.expand(2, *t.shape[1:])


def _shapes(example):
    """The per-sample shape of the inputs, for the record: a list, or a dict of lists by input name."""
    if isinstance(example, torch.Tensor):
        return list(example.shape[1:])
    if isinstance(example, Mapping):
        return {k: _shapes(v) for k, v in example.items() if isinstance(v, torch.Tensor)}
    if isinstance(example, (tuple, list)):
        return [_shapes(v) for v in example]
    return None


def load_pruned(path: str | os.PathLike, device: torch.device | str = "cpu") -> nn.Module:
    """Load a file written by :func:`save_pruned` as a runnable module (a ``torch.fx.GraphModule``).

    Nothing is unpickled; see the module docstring for what is checked. The module is for inference:
    BatchNorm layers were captured in eval mode.
    """
    from torch._export.serde import schema
    from torch._export.serde.serialize import ExportedProgramDeserializer, _dict_to_dataclass

    tensors, metadata = _read(path)
    try:
        graph = json.loads(metadata["program"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise ValfreeError(f"{path} has no readable graph in its metadata ({exc}); "
                           "it was not written by save_pruned.") from None
    problem = _check_graph(graph)
    if problem:
        raise ValfreeError(f"{path} is refused: its graph uses {problem}; only ATen operators and plain size "
                           "arithmetic are loaded.")
    graph["guards_code"] = []  # Python source in upstream files; never executed here
    for node in graph["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}
    try:
        program = _dict_to_dataclass(schema.ExportedProgram, graph)
        parameters = {spec.parameter.parameter_name for spec in program.graph_module.signature.input_specs
                      if spec.type == "parameter"}
        state = {k[len(_STATE):]: v for k, v in tensors.items() if k.startswith(_STATE)}
        state = {k: nn.Parameter(v) if k in parameters else v for k, v in state.items()}
        constants = {k[len(_CONSTANT):]: v for k, v in tensors.items() if k.startswith(_CONSTANT)}
        exported = ExportedProgramDeserializer().deserialize(program, state, constants, None)
        module = exported.module()
    except ValfreeError:
        raise
    except Exception as exc:
        raise ValfreeError(f"{path} could not be rebuilt ({type(exc).__name__}: {str(exc).strip()[:300]}); "
                           f"it was written by torch {metadata.get('torch_version', '?')}, this is torch "
                           f"{torch.__version__}.") from None
    return module.to(device)


def read_pruned_info(path: str | os.PathLike) -> dict[str, Any]:
    """valfree's record stored with a pruned model: criterion, ratio, history, input shape."""
    _, metadata = _read(path, with_tensors=False)
    info = json.loads(metadata.get("info", "{}"))
    info["input_shape"] = json.loads(metadata.get("input_shape", "null"))
    info["torch_version"] = metadata.get("torch_version")
    return info


def _read(path, with_tensors: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    p = Path(path)
    if not p.is_file():
        raise ValfreeError(f"{p} does not exist.")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except Exception as exc:
        raise ValfreeError(f"{p} is not a safetensors file ({str(exc).strip()[:200]}); pruned models are saved "
                           "by valfree prune / save_pruned.") from None
    if metadata.get("format") != FORMAT:
        raise ValfreeError(f"{p} is a safetensors file but not a valfree pruned model (no format={FORMAT!r} "
                           "in its metadata); plain weights load with valfree.io.load_into and the model's factory.")
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValfreeError(f"{p} has pruned-model format version {metadata.get('format_version')!r}; this valfree "
                           f"reads version {FORMAT_VERSION}.")
    return tensors, metadata


def _check_graph(graph: Any) -> str | None:
    """A description of the first thing the loader refuses in a serialized graph, or None."""
    try:
        nodes = graph["graph_module"]["graph"]["nodes"]
    except (KeyError, TypeError):
        return "no graph_module.graph.nodes"
    for node in nodes:
        target = node.get("target") if isinstance(node, dict) else None
        if not isinstance(target, str) or not _ALLOWED_CALL_TARGETS.match(target):
            return f"the operator {target!r}"
        if any(target.split(".")[3] == bad or target.split(".")[3].startswith(bad + "_") for bad in _DENIED_ATEN
               if target.startswith("torch.ops.aten.")):
            return f"the operator {target!r}"
    for expr in _expression_strings(graph):
        if not _is_plain_sympy(expr):
            return f"the size expression {expr[:80]!r}"
    return None


def _expression_strings(obj):
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "expr_str":
                yield value if isinstance(value, str) else repr(value)
            else:
                yield from _expression_strings(value)
    elif isinstance(obj, list):
        for value in obj:
            yield from _expression_strings(value)


def _is_plain_sympy(expr: str) -> bool:
    position = 0
    while position < len(expr):
        match = _EXPR_TOKEN.match(expr, position)
        if match is None:
            return False
        name = match.group("name")
        if name is not None and name not in _SYMPY_NAMES:
            return False
        position = match.end()
        if position < len(expr) and not expr[position:].strip():
            break
    return True
