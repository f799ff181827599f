"""Tiny models and data functions for `valfree score --preset` tests (valid MODULE:FACTORY specs)."""

import math

import torch
from torch import nn
from torch.utils.data import TensorDataset

from valfree.probes import ddpm_alphas_cumprod


def seg_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 5, 3, padding=1), nn.ReLU(), nn.Conv2d(5, 4, 1))


def seg_data():
    g = torch.Generator().manual_seed(0)
    masks = torch.randint(0, 4, (12, 6, 6), generator=g)
    masks[:, 0, :] = 255  # void pixels
    return TensorDataset(torch.randn(12, 1, 6, 6, generator=g), masks)


class TinyCenterNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, stride=2, padding=1), nn.ReLU())
        self.heatmap = nn.Conv2d(6, 3, 1)
        self.box = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        f = self.body(x)
        return torch.cat([self.heatmap(f), self.box(f)], 1)


def det_data():
    g = torch.Generator().manual_seed(1)
    y = torch.rand(10, 5, 4, 4, generator=g) ** 3 * 0.9
    y[:, 3:] = math.nan
    for i in range(10):  # one object per image: a heatmap peak of 1 and its box size
        c, r, k = i % 3, i % 4, (i + 1) % 4
        y[i, c, r, k] = 1.0
        y[i, 3:, r, k] = torch.tensor([1.5 + 0.1 * i, 2.0])
    return TensorDataset(torch.randn(10, 1, 8, 8, generator=g), y)


class TinyDenoiser(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Conv2d(1, 6, 3, padding=1)
        self.time = nn.Embedding(100, 6)
        self.head = nn.Conv2d(6, 1, 1)
        self.register_buffer("alphas_cumprod", ddpm_alphas_cumprod(100, 1e-4, 0.05), persistent=False)

    def forward(self, x, t):
        return self.head(torch.tanh(self.body(x) + self.time(t)[:, :, None, None]))


def diffusion_data():
    return TensorDataset(torch.rand(16, 1, 6, 6, generator=torch.Generator().manual_seed(2)) * 2 - 1)


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=30, n_positions=8, n_embd=8, n_layer=1, n_head=2))


def token_data():
    return TensorDataset(torch.randint(0, 30, (12, 8), generator=torch.Generator().manual_seed(3)))


class ThreeByThreeOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 4, 1)
        self.conv_out = nn.Conv2d(4, 1, 3, padding=1)

    def forward(self, x, t):
        return self.conv_out(self.body(x))
