"""The pruned-model file: same outputs without the factory, nothing unpickled, tampered files refused."""

import json
import pickle

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from valfree import ValfreeError, prune
from valfree.models import resnet
from valfree.pruning import load_pruned, read_pruned_info, save_pruned


@pytest.fixture
def pruned_cnn(trained_cnn, digits):
    return prune(trained_cnn, digits[0], "jbr", ratio=0.5, steps=2, calibration_size=256)


def test_pruned_cnn_loads_back_with_the_same_outputs(pruned_cnn, digits, tmp_path):
    path = save_pruned(pruned_cnn.model, tmp_path / "cnn.safetensors", pruned_cnn.example_inputs,
                       info=pruned_cnn.to_dict())
    loaded = load_pruned(path)
    assert not any(isinstance(m, type(pruned_cnn.model)) for m in loaded.modules())  # no factory class inside
    x = digits[1].tensors[0]
    for batch in (x[:1], x[:7], x[:300]):  # the batch dimension stays dynamic
        with torch.no_grad():
            torch.testing.assert_close(loaded(batch), pruned_cnn.model(batch), rtol=0, atol=1e-6)
    info = read_pruned_info(path)
    assert info["criterion"] == "jbr" and info["ratio"] == 0.5 and info["input_shape"] == [1, 8, 8]
    assert [s["params"] for s in info["history"]] == [s.params for s in pruned_cnn.history]


def test_pruned_residual_network_loads_back(digits, tmp_path):
    torch.manual_seed(1)
    result = prune(resnet(in_size=8, width=8).eval(), digits[0], "l1", ratio=0.5, steps=1)
    loaded = load_pruned(save_pruned(result.model, tmp_path / "resnet.safetensors", result.example_inputs))
    x = digits[1].tensors[0][:50]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), result.model(x), rtol=0, atol=1e-6)


def test_loading_never_unpickles(pruned_cnn, tmp_path, monkeypatch):
    path = save_pruned(pruned_cnn.model, tmp_path / "cnn.safetensors", pruned_cnn.example_inputs)

    def refuse(*args, **kwargs):
        raise AssertionError("unpickling attempted")

    for target, name in ((torch, "load"), (torch.serialization, "load"), (pickle, "load"), (pickle, "loads"),
                         (pickle, "Unpickler")):
        monkeypatch.setattr(target, name, refuse)
    monkeypatch.setattr(torch._C, "_pickle_load_obj", refuse, raising=False)
    x = pruned_cnn.example_inputs
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(path)(x), pruned_cnn.model(x))


def rewrite(path, edit):
    """Apply ``edit(graph_dict)`` to the graph stored in a pruned file, as an attacker could."""
    with safe_open(str(path), framework="pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    graph = json.loads(metadata["program"])
    edit(graph)
    metadata["program"] = json.dumps(graph)
    save_file(tensors, str(path), metadata=metadata)


def first_node(graph):
    return graph["graph_module"]["graph"]["nodes"][0]


@pytest.mark.parametrize("target", ["torch.hub.load", "builtins.eval", "torch.ops.aten.from_file.default",
                                    "torch.load"])
def test_a_graph_calling_anything_but_aten_is_refused(pruned_cnn, tmp_path, target):
    path = save_pruned(pruned_cnn.model, tmp_path / "m.safetensors", pruned_cnn.example_inputs)
    rewrite(path, lambda g: first_node(g).update(target=target))
    with pytest.raises(ValfreeError, match=f"is refused: its graph uses the operator '{target}'"):
        load_pruned(path)


def test_a_size_expression_with_code_is_refused(pruned_cnn, tmp_path):
    path = save_pruned(pruned_cnn.model, tmp_path / "m.safetensors", pruned_cnn.example_inputs)
    marker = tmp_path / "pwned"

    def inject(graph):
        text = json.dumps(graph)
        assert "Symbol(" in text  # the dynamic batch size is stored as a sympy expression
        start = text.index('"expr_str":') + len('"expr_str":')
        end = text.index('"', text.index('"', start) + 1) + 1
        payload = json.dumps(f"__import__('pathlib').Path('{marker}').touch()")
        graph.clear()
        graph.update(json.loads(text[:start] + payload + text[end:]))

    rewrite(path, inject)
    with pytest.raises(ValfreeError, match="is refused: its graph uses the size expression"):
        load_pruned(path)
    assert not marker.exists()


def test_guard_code_in_the_file_is_never_run(pruned_cnn, tmp_path):
    path = save_pruned(pruned_cnn.model, tmp_path / "m.safetensors", pruned_cnn.example_inputs)
    marker = tmp_path / "pwned"
    rewrite(path, lambda g: g.update(guards_code=[f"__import__('pathlib').Path('{marker}').touch()"]))
    model = load_pruned(path)
    model(pruned_cnn.example_inputs)
    assert not marker.exists()


def test_files_that_are_not_pruned_models(tmp_path, trained_cnn):
    plain = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in trained_cnn.state_dict().items()}, str(plain))
    with pytest.raises(ValfreeError, match="not a valfree pruned model"):
        load_pruned(plain)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValfreeError, match="is not a safetensors file"):
        load_pruned(garbage)
    with pytest.raises(ValfreeError, match="does not exist"):
        load_pruned(tmp_path / "missing.safetensors")
