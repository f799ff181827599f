"""Saving and loading a pruned model that takes keyword inputs (``input_ids``, ``attention_mask``), as a
Hugging Face model does: the loaded module takes the same keywords, at any batch size and sequence
length the model allows, returns the logits, and loads without transformers.

Tolerance: the loaded graph runs the ATen operators the eager model ran, in the same order, on the same
weights, so the logits agree to float32 rounding (atol 1e-6 on logits of order 1, as for the CNN).
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import nn

pytest.importorskip("transformers")

from valfree import ValfreeError  # noqa: E402
from valfree.pruning import load_pruned, prune, read_pruned_info, save_pruned  # noqa: E402

from tests.commands.hf_trainer_data import LENGTH, dataset, tiny_bert  # noqa: E402
from tests.commands.prune_text_models import unexportable_classifier  # noqa: E402

from .test_dict_inputs import only_ffn  # noqa: E402


@pytest.fixture(scope="module")
def pruned_bert():
    bert = tiny_bert().eval()
    return prune(bert, dataset(), "jbr", ratio=0.5, steps=1, confidence=0.0, calibration_size=16,
                 ignored_layers=only_ffn(bert))


@pytest.fixture(scope="module")
def saved_bert(pruned_bert, tmp_path_factory):
    path = tmp_path_factory.mktemp("bert") / "bert.safetensors"
    return save_pruned(pruned_bert.model, path, pruned_bert.example_inputs, info=pruned_bert.to_dict())


def test_pruned_bert_loads_back_taking_keywords_with_the_same_logits(pruned_bert, saved_bert):
    ds = dataset()
    loaded = load_pruned(saved_bert)
    assert pruned_bert.model.bert.encoder.layer[0].intermediate.dense.out_features == 16
    # Batch size and sequence length both stay dynamic; keyword order does not matter.
    for batch, length in ((1, LENGTH), (7, 6), (48, LENGTH), (3, 1)):
        ids, mask = ds.ids[:batch, :length], ds.mask[:batch, :length]
        with torch.no_grad():
            got = loaded(attention_mask=mask, input_ids=ids)
            want = pruned_bert.model(input_ids=ids, attention_mask=mask).logits
        assert isinstance(got, torch.Tensor)  # the logits, not transformers' output class
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    info = read_pruned_info(saved_bert)
    assert info["input_shape"] == {"input_ids": [LENGTH], "attention_mask": [LENGTH]}
    assert info["criterion"] == "jbr"


def test_loading_a_pruned_hugging_face_model_does_not_need_transformers(saved_bert):
    code = (
        "import sys, torch\n"
        "from valfree.pruning import load_pruned\n"
        f"model = load_pruned({str(saved_bert)!r})\n"
        "ids = torch.ones(2, 5, dtype=torch.long)\n"
        "assert model(input_ids=ids, attention_mask=ids).shape == (2, 2)\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


class AnyKeywords(nn.Module):
    """A forward that takes its inputs as **kwargs and returns a dict."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)

    def forward(self, **inputs):
        return {"logits": self.fc(inputs["features"]) * inputs["scale"], "features": inputs["features"]}


def test_a_forward_taking_any_keywords_keeps_its_outputs(tmp_path):
    model = AnyKeywords().eval()
    example = {"features": torch.randn(1, 4), "scale": torch.ones(1, 1)}
    loaded = load_pruned(save_pruned(model, tmp_path / "kw.safetensors", example))
    x = {"features": torch.randn(5, 4), "scale": torch.rand(5, 1)}
    with torch.no_grad():
        got, want = loaded(**x), model(**x)
    assert set(got) == {"logits", "features"}
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_a_model_torch_export_cannot_capture_is_one_sentence(tmp_path):
    example = {"input_ids": torch.ones(1, LENGTH, dtype=torch.long),
               "attention_mask": torch.ones(1, LENGTH, dtype=torch.long)}
    with pytest.raises(ValfreeError, match="torch.export cannot capture the pruned model") as caught:
        save_pruned(unexportable_classifier().eval(), tmp_path / "u.safetensors", example)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "u.safetensors").exists()
