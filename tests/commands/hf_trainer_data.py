"""A Hugging Face-style token classification dataset: dicts of ``input_ids``, ``attention_mask`` and
``labels``, as a tokenizer and ``datasets`` hand them to the Trainer. Used as a ``MODULE:FUNCTION`` data
spec by the tests that score a Trainer's checkpoints, and to train them."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset

VOCAB, LENGTH, PAD = 50, 10, 0


class TokenTask(Dataset):
    """Sequences of 4 to 10 real tokens, right-padded with token 0 and masked; the label says whether
    most real tokens come from the lower half of the vocabulary."""

    def __init__(self, n: int = 48, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, VOCAB, (n, LENGTH), generator=g)
        lengths = torch.randint(4, LENGTH + 1, (n,), generator=g)
        self.mask = (torch.arange(LENGTH) < lengths[:, None]).long()
        self.ids = torch.where(self.mask.bool(), self.ids, torch.full_like(self.ids, PAD))
        self.labels = (((self.ids < VOCAB // 2) & self.mask.bool()).sum(1) * 2 > lengths).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.labels[i]}


def dataset(split: str = "train") -> TokenTask:
    return TokenTask(48, seed=0 if split == "train" else 1)


def tiny_bert(attention: str | None = None):
    """A 1-layer BERT classifier from a config (no download). ``attention="eager"`` for forward-mode
    differentiation, which PyTorch's fused attention does not implement."""
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=LENGTH, num_labels=2, pad_token_id=PAD)
    if attention is not None:
        config._attn_implementation = attention
    torch.manual_seed(0)
    return BertForSequenceClassification(config)
