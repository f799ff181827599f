"""Pruning pads token ids of unequal length with the model's pad token, not 0: calibration, the
evaluation batches and the fine-tuning batches."""

from torch.utils.data import DataLoader

from valfree.batches import collate
from valfree.pruning import prune
from valfree.pruning.calibration import calibration_from

from tests.pad_token_models import (PAD, RaggedTokens, RecordingTokenModel, assert_calls_padded,
                                    assert_padded_with_the_pad_token)


def test_prune_pads_calibration_evaluation_and_fine_tuning_with_the_models_pad_token():
    model = RecordingTokenModel()
    result = prune(model, RaggedTokens(), "jbr", ratio=0.5, steps=1, confidence=0.0, calibration_size=16,
                   batch_size=8, finetune_steps=2, eval_data=RaggedTokens(8, seed=1), inplace=True)
    assert result.model.fc.out_features == 8
    assert_calls_padded(model)


def test_calibration_from_a_loader_of_ragged_batches_pads_with_the_given_token():
    batches = DataLoader(RaggedTokens(), batch_size=4, collate_fn=lambda items: collate(items, PAD))
    cal = calibration_from(batches, batch_size=24, max_samples=None, pad_token_id=PAD)
    assert_padded_with_the_pad_token(cal.inputs[0]["input_ids"], cal.inputs[0]["attention_mask"])
