"""TPV pads token ids of unequal length with the model's pad token, not 0."""

from torch.utils.data import DataLoader

import valfree
from valfree.batches import collate
from valfree.tpv import rank_models, tpv_trajectory

from tests.pad_token_models import PAD, RaggedTokens, RecordingTokenModel, assert_calls_padded


def test_tpv_on_ragged_items_pads_with_the_models_pad_token():
    model = RecordingTokenModel()
    estimate = valfree.tpv(model, RaggedTokens(12), "iso:0.01", "monte_carlo", probes=2, seed=0)
    assert estimate.n_inputs == 12
    assert_calls_padded(model)


def test_a_loader_of_ragged_batches_ranking_and_trajectories_pad_with_the_models_pad_token():
    loader = DataLoader(RaggedTokens(12), batch_size=4, collate_fn=lambda items: collate(items, PAD))
    model = RecordingTokenModel()
    valfree.tpv(model, loader, "iso:0.01", "monte_carlo", probes=2, seed=0)
    assert_calls_padded(model)
    ranked, trajectory = RecordingTokenModel(), RecordingTokenModel()
    rank_models({"a": ranked}, RaggedTokens(12), "iso:0.01", "monte_carlo", probes=2, seed=0)
    tpv_trajectory([(1, trajectory), (2, lambda: trajectory)], RaggedTokens(12), "iso:0.01", "monte_carlo",
                   probes=2, seed=0)
    assert_calls_padded(ranked)
    assert_calls_padded(trajectory)
