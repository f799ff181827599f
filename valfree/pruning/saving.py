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

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

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


def save_pruned(model: nn.Module, path: str | os.PathLike, example_inputs: torch.Tensor,
                info: dict[str, Any] | None = None, dynamic_batch: bool = True) -> Path:
    """Export ``model`` (eval mode) with ``example_inputs`` and write it to ``path`` as described above.

    The batch dimension stays dynamic unless ``dynamic_batch=False``. ``info`` (JSON-serialisable)
    is stored alongside and comes back from :func:`read_pruned_info`.
    """
    from torch._export.serde.serialize import ExportedProgramSerializer, _to_json_bytes

    path = Path(path)
    model = model.eval()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    example = example_inputs[:2] if len(example_inputs) >= 2 else example_inputs.expand(2, *example_inputs.shape[1:])
    example = example.to(device)  # two samples: a batch of one would be specialised to a constant
    dynamic = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    try:
        program = torch.export.export(model, (example.contiguous(),), dynamic_shapes=dynamic)
    except Exception as exc:
        raise ValfreeError(f"torch.export cannot capture the pruned model ({type(exc).__name__}: "
                           f"{str(exc).strip().splitlines()[0][:300]}), so it cannot be saved factory-free.") from None
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
        "input_shape": json.dumps(list(example_inputs.shape[1:])),
        "info": json.dumps(info or {}, default=str),
    }
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


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
