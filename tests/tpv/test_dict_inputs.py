"""TPV on a dataset of dicts (input_ids, attention_mask, labels), as a Hugging Face model takes it: the
inputs go to the model as keyword arguments and the logits are read from its output. Each value must
equal the same computation on a wrapper that passes those keyword arguments by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

pytest.importorskip("transformers")

import valfree  # noqa: E402
from valfree.tpv import as_inputs  # noqa: E402

from tests.commands.hf_trainer_data import dataset, tiny_bert  # noqa: E402


class ByHand(nn.Module):
    """The same BERT on one stacked tensor, its keyword arguments passed by hand."""

    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, x):
        return self.bert(input_ids=x[:, 0], attention_mask=x[:, 1]).logits


@pytest.fixture(scope="module")
def setup():
    ds = dataset()
    bert = tiny_bert("eager")  # forward-mode differentiation (prune, sgd) has no rule for fused attention
    n = 8
    return bert, ByHand(bert), Subset(ds, range(n)), torch.stack([ds.ids[:n], ds.mask[:n]], 1)


def test_a_dict_dataset_becomes_keyword_inputs_without_labels(setup):
    _, _, items, _ = setup
    x = as_inputs(items)
    assert set(x) == {"input_ids", "attention_mask"} and x["input_ids"].shape == (8, 10)
    joined = as_inputs(DataLoader(items, batch_size=3))
    assert all(torch.equal(joined[k], x[k]) for k in x)
    assert set(as_inputs({**x, "labels": torch.zeros(8)})) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("noise, method", [
    ("iso:0.01", "trace"),          # per-sample hooks; embeddings and LayerNorm one sample at a time
    ("prune:0.3", "trace"),         # forward mode through functional_call with keyword arguments
    ("sgd:lr=0.1,batch=8", "trace"),
    ("iso:0.01", "monte_carlo"),
])
def test_tpv_on_dict_inputs_equals_the_keyword_arguments_passed_by_hand(setup, noise, method):
    bert, by_hand, items, stacked = setup
    got = valfree.tpv(bert, items, noise, method, probes=2, seed=0)
    expected = valfree.tpv(by_hand, stacked, noise, method, probes=2, seed=0)
    assert got.n_inputs == 8 and got.value > 0
    assert got.value == pytest.approx(expected.value, rel=1e-6)
    assert got.stderr == pytest.approx(expected.stderr, rel=1e-5, abs=1e-12)
    # the attention mask is used: without it the padded tokens move the outputs too
    if (noise, method) == ("prune:0.3", "trace"):
        unmasked = valfree.tpv(bert, {"input_ids": stacked[:, 0]}, noise, method, probes=2, seed=0)
        assert unmasked.value != pytest.approx(got.value, rel=1e-4)
