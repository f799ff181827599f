"""A token classifier whose pad token is not 0, and unpadded items of several lengths, for the tests that
check that every path batching such items pads ``input_ids`` with the model's own pad token."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import nn
from torch.utils.data import Dataset

PAD = 7  # not 0, and never a real token below
VOCAB = 12


class RecordingTokenModel(nn.Module):
    """Takes ``input_ids`` and ``attention_mask`` by name, carries ``config.pad_token_id`` as a
    transformers model does, and keeps the token ids of every (plain, eager) call it gets."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(pad_token_id=PAD)
        self.embed = nn.Embedding(VOCAB, 8)
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids, attention_mask):
        if type(input_ids) is torch.Tensor:  # not a functorch wrapper (per-sample or forward-mode passes)
            self.seen.append((input_ids.detach().cpu().clone(), attention_mask.detach().cpu().clone()))
        mask = attention_mask[..., None].float()
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(torch.relu(self.fc(pooled)))


class RaggedTokens(Dataset):
    """Unpadded items of 2 to 6 tokens (ids 1..6, so neither 0 nor the pad token), with labels."""

    def __init__(self, n: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.randint(2, 7, (n,), generator=g)
        self.items = [{"input_ids": torch.randint(1, PAD, (int(k),), generator=g),
                       "attention_mask": torch.ones(int(k), dtype=torch.long),
                       "labels": torch.randint(0, 3, (), generator=g)} for k in lengths]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def assert_padded_with_the_pad_token(ids: torch.Tensor, mask: torch.Tensor) -> None:
    padding = mask == 0
    assert ids.shape == mask.shape
    assert (ids[padding] == PAD).all(), ids
    assert (ids[~padding] != PAD).all(), ids


def assert_calls_padded(model: RecordingTokenModel) -> None:
    """Every recorded call pads with the model's token, and some call held padding at all."""
    assert model.seen
    for ids, mask in model.seen:
        assert_padded_with_the_pad_token(ids, mask)
    assert any((mask == 0).any() for _, mask in model.seen)
