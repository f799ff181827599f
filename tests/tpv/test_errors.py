"""Bad input gets one clear ValfreeError."""

import pytest
import torch
from torch import nn

import valfree
from valfree.errors import ValfreeError

from . import zoo


def test_model_without_trainable_parameters():
    model = zoo.fm_mlp().requires_grad_(False)
    with pytest.raises(ValfreeError, match="no trainable parameters"):
        valfree.tpv(model, zoo.inputs_for("mlp", 4), "iso:0.1")
    with pytest.raises(ValfreeError, match="no trainable parameters"):
        valfree.tpv(nn.ReLU(), torch.randn(4, 3), "iso:0.1")


def test_inputs_of_the_wrong_shape():
    with pytest.raises(ValfreeError, match=r"cannot take inputs of shape \(4, 3, 5, 5\)"):
        valfree.tpv(zoo.fm_mlp(), torch.randn(4, 3, 5, 5, dtype=torch.float64), "iso:0.1")
    with pytest.raises(ValfreeError, match="at least 2 inputs"):
        valfree.tpv(zoo.fm_mlp(), torch.randn(1, 1, 8, 8, dtype=torch.float64), "iso:0.1")
    with pytest.raises(ValfreeError, match="must be a tensor"):
        valfree.tpv(zoo.fm_mlp(), "images.npy", "iso:0.1")


def test_exact_mode_states_its_memory_estimate_and_the_limit():
    with pytest.raises(ValfreeError, match=r"exact mode needs about .* GiB .* over the limit of"):
        valfree.tpv(zoo.fm_mlp(), zoo.inputs_for("mlp", 8), "iso:0.1", "exact", max_exact_bytes=10_000)


@pytest.mark.parametrize("kwargs, message", [
    ({"method": "hutchinson"}, "unknown TPV method"),
    ({"probes": 1}, "at least 2"),
    ({"outputs": "softmax"}, "outputs must be one of"),
    ({"engine": "magic"}, "unknown per-sample engine"),
    ({"batch_size": 0}, "batch_size"),
])
def test_bad_options(kwargs, message):
    with pytest.raises(ValfreeError, match=message):
        valfree.tpv(zoo.fm_mlp(), zoo.inputs_for("mlp", 4), "iso:0.1", **kwargs)


def test_noise_specs_reach_the_user_through_tpv():
    with pytest.raises(ValfreeError, match="bits from 1 to 32"):
        valfree.tpv(zoo.fm_mlp(), zoo.inputs_for("mlp", 4), "quant:0")


def test_valfree_tpv_is_callable_as_a_function_and_as_the_package():
    import valfree.tpv.noise  # binds the package to the name valfree.tpv

    est = valfree.tpv(zoo.fm_mlp(), zoo.inputs_for("mlp", 4), valfree.noise.Isotropic(0.1), probes=2)
    assert est.value > 0


class DictOutput(nn.Module):
    """Like a Hugging Face model: returns a mapping, the logits inside."""

    def __init__(self):
        super().__init__()
        self.body = zoo.fm_mlp()

    def forward(self, x):
        return {"logits": self.body(x)}


class ListOutput(nn.Module):
    """An output whose first tensor is not batch-first: no logits to find."""

    def __init__(self):
        super().__init__()
        self.body = zoo.fm_mlp()

    def forward(self, x):
        return [self.body(x).sum()]


def test_the_logits_of_a_mapping_output_are_measured():
    x = zoo.inputs_for("mlp", 6)
    with pytest.raises(ValfreeError, match="outputs=a function that picks the logits"):
        valfree.tpv(ListOutput(), x, "iso:0.1")
    read = valfree.tpv(DictOutput(), x, "iso:0.1", probes=2, seed=1)
    picked = valfree.tpv(DictOutput(), x, "iso:0.1", outputs=lambda out: out["logits"], probes=2, seed=1)
    plain = valfree.tpv(zoo.fm_mlp(), x, "iso:0.1", probes=2, seed=1)
    assert picked.value == pytest.approx(plain.value, rel=1e-12)
    assert read.value == pytest.approx(plain.value, rel=1e-12)
