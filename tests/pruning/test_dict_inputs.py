"""Pruning on a dataset of dicts (input_ids, attention_mask, labels), as a Hugging Face model takes it:
calibration keeps the token ids as integers, the model gets keyword arguments, the labels come from
``labels``, Torch-Pruning traces with keyword inputs, and the pruned model still runs on dict inputs."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

pytest.importorskip("transformers")

from valfree.batches import forward  # noqa: E402
from valfree.pruning import prune  # noqa: E402
from valfree.pruning.calibration import calibration_from  # noqa: E402

from tests.commands.hf_trainer_data import dataset, tiny_bert  # noqa: E402


def only_ffn(model):
    """Every linear layer but the feed-forward expansion: attention reshapes by a fixed head size."""
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "intermediate" not in n]


def test_calibration_keeps_dict_inputs_and_reads_the_labels_entry():
    ds = dataset()
    cal = calibration_from(ds, batch_size=5, max_samples=12, labels=True)
    assert [set(x) for x in cal.inputs] == [{"input_ids", "attention_mask"}] * 3
    assert cal.inputs[0]["input_ids"].dtype == torch.long and cal.num_samples == 12
    assert torch.cat(cal.labels).tolist() == [int(ds[i]["labels"]) for i in sorted(
        torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:12].tolist())]
    joined = calibration_from(DataLoader(ds, batch_size=4), batch_size=8, max_samples=12)
    assert [x["input_ids"].shape[0] for x in joined.inputs] == [8, 4]
    assert set(cal.example_inputs()) == {"input_ids", "attention_mask"}


@pytest.mark.parametrize("criterion", ["jbr", "taylor"])
def test_pruned_bert_still_runs_on_dict_inputs(criterion):
    ds = dataset()
    bert = tiny_bert().eval()
    batch = {"input_ids": ds.ids[:6], "attention_mask": ds.mask[:6]}
    result = prune(bert, ds, criterion, ratio=0.5, steps=1, confidence=0.0, calibration_size=16,
                   ignored_layers=only_ffn(bert))
    dense = result.model.bert.encoder.layer[0].intermediate.dense
    assert dense.out_features == 16 and result.removed("channels") == pytest.approx(0.5)
    assert set(result.example_inputs) == {"input_ids", "attention_mask"}
    with torch.no_grad():
        out = forward(result.model, {**batch, "labels": ds.labels[:6]})
    assert out.logits.shape == (6, 2) and torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
