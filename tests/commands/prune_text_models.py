"""Text classifiers taking ``input_ids`` and ``attention_mask`` by name, as a Hugging Face model does, for
``valfree prune`` on dict data (``--model tests/commands/prune_text_models.py:token_classifier``)."""

import torch
from torch import nn

from tests.commands.hf_trainer_data import PAD, VOCAB


class TokenClassifier(nn.Module):
    """Embedding, masked mean over the tokens, two hidden layers, a linear head."""

    def __init__(self, dim: int = 16, hidden: int = 32, classes: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim, padding_idx=PAD)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def pooled(self, input_ids, attention_mask):
        mask = attention_mask[..., None].float()
        return (self.embed(input_ids) * mask).sum(1) / mask.sum(1).clamp(min=1)

    def forward(self, input_ids, attention_mask):
        h = torch.relu(self.fc1(self.pooled(input_ids, attention_mask)))
        return self.head(torch.relu(self.fc2(h)))


class UnexportableClassifier(TokenClassifier):
    """Leaves torch for NumPy in forward: it runs and prunes, but torch.export cannot capture it."""

    def forward(self, input_ids, attention_mask):
        longest = int(attention_mask.sum(1).max().cpu().numpy())
        return super().forward(input_ids[:, :longest], attention_mask[:, :longest])


def token_classifier():
    torch.manual_seed(0)
    return TokenClassifier()


def unexportable_classifier():
    torch.manual_seed(0)
    return UnexportableClassifier()
