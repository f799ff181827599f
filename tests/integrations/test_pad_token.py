"""The callbacks' fixed data (probe batch and prediction-change subset) pads token ids of unequal length
with the model's pad token, not 0: drawn from a dataset without a collator, from a loader whose collator
cannot batch ragged items, and from the first training batches. The draw is collated once the model is
known (``CheckMeasurer.prepare`` or the first check)."""

from types import SimpleNamespace

import torch

import valfree
from valfree.batches import collate
from valfree.integrations.checks import CheckMeasurer
from valfree.probes import ProbeOptions

from tests.pad_token_models import (PAD, RaggedTokens, RecordingTokenModel, assert_calls_padded,
                                    assert_padded_with_the_pad_token)


def stacking_only(items):
    """A collator like transformers' default_data_collator: it stacks, so ragged items make it fail."""
    return {k: torch.stack([item[k] for item in items]) for k in items[0]}


def fixed_inputs(measurer):
    return measurer.data.inputs["input_ids"], measurer.data.inputs["attention_mask"]


def test_a_drawn_subset_is_padded_with_the_models_pad_token():
    for collate_fn in (None, stacking_only):
        measurer = CheckMeasurer(options=ProbeOptions(), pred_subset=16, probe_size=8)
        measurer.offer_loader(SimpleNamespace(dataset=RaggedTokens(), collate_fn=collate_fn))
        assert measurer.ready
        state = measurer.state_dict()  # drawn, not collated yet: the saved state names the same rows
        measurer.prepare(RecordingTokenModel())
        assert measurer.state_dict()["data"] == state["data"]
        assert_padded_with_the_pad_token(*fixed_inputs(measurer))


def test_rows_kept_from_ragged_training_batches_are_padded_with_the_models_pad_token():
    ds = RaggedTokens()
    measurer = CheckMeasurer(options=ProbeOptions(), pred_subset=16, probe_size=8)
    for start in (0, 4, 8, 12):  # batches padded to their own lengths, as a padding collator gives them
        measurer.offer_batch(collate([ds[i] for i in range(start, start + 4)], PAD))
    measurer.prepare(RecordingTokenModel())
    ids, mask = fixed_inputs(measurer)
    assert ids.shape[0] == 16
    assert_padded_with_the_pad_token(ids, mask)


def test_a_monitor_given_a_ragged_dataset_probes_it_padded_with_the_models_pad_token():
    model = RecordingTokenModel()
    monitor = valfree.Monitor(model, train_data=RaggedTokens(), every=1, pred_subset=16, probe_size=8)
    monitor.step(1)
    monitor.step(2)
    assert monitor.last_columns["pred_subset"] == 16
    assert_calls_padded(model)
