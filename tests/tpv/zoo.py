"""Small float64 models that exercise every per-sample rule and the fallbacks."""

from __future__ import annotations

import torch
from torch import nn

from valfree.models import CNN, mlp


def _seeded(seed: int):
    torch.manual_seed(seed)


def small_mlp(seed: int = 0, inplace: bool = True) -> nn.Module:
    _seeded(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.ReLU(inplace=inplace), nn.Linear(12, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def small_cnn(seed: int = 0) -> nn.Module:
    """valfree's CNN (BatchNorm, bias-free convs) on 8x8 inputs, with non-trivial running statistics."""
    _seeded(seed)
    model = CNN(num_classes=4, in_size=8, width=3).double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
    return model


class ConvZoo(nn.Module):
    """Conv1d with bias, grouped/strided/dilated Conv2d, a conv whose output grid is tiny (Gram path)."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(2, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2)
        self.c3 = nn.Conv2d(8, 6, 3)  # 4x4 -> 2x2: few locations, so the Gram form is cheaper
        self.fc = nn.Linear(6 * 4, 3)

    def forward(self, x):  # x: (N, 2, 64)
        h = torch.tanh(self.c1(x)).reshape(x.shape[0], 4, 8, 8)
        h = torch.tanh(self.c2(h))
        h = torch.tanh(self.c3(h))
        return self.fc(h.flatten(1))


class TokenNet(nn.Module):
    """Embedding (with padding and repeated tokens), LayerNorm and Linear over tokens, a bare Parameter."""

    def __init__(self, tokens: int = 5, vocab: int = 7, dim: int = 6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.pos = nn.Parameter(torch.randn(tokens, dim) * 0.1)  # used outside any rule: takes the fallback
        self.norm = nn.LayerNorm(dim)
        self.wide = nn.Linear(dim, 40)   # T*T*(i+o) > T*i*o: materialised per-sample gradient
        self.narrow = nn.Linear(40, 2)   # the Gram form over tokens
        self.head = nn.Linear(2, 3)

    def forward(self, idx):
        h = self.norm(self.embed(idx) + self.pos)
        h = self.narrow(torch.relu(self.wide(h)))
        return self.head(h.mean(1))


class Tied(nn.Module):
    """One Linear used twice and a weight shared by two modules: both need the fallback."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.b.weight = self.a.weight
        self.head = nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))))


def token_net(seed: int = 0) -> nn.Module:
    _seeded(seed)
    return TokenNet().double()


def conv_zoo(seed: int = 0) -> nn.Module:
    _seeded(seed)
    return ConvZoo().double()


def tied(seed: int = 0) -> nn.Module:
    _seeded(seed)
    return Tied().double()


def fm_mlp(seed: int = 0, width: int = 16) -> nn.Module:
    _seeded(seed)
    return mlp(num_classes=10, in_size=8, width=width, depth=1).double()


def inputs_for(name: str, n: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if name == "token_net":
        idx = torch.randint(0, 7, (n, 5), generator=g)
        idx[:, 1] = idx[:, 3]  # repeated tokens in every sample
        return idx
    if name == "conv_zoo":
        return torch.randn(n, 2, 64, generator=g, dtype=torch.float64)
    if name == "tied":
        return torch.randn(n, 5, generator=g, dtype=torch.float64)
    if name == "small_mlp":
        return torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64)
    return torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64)


ZOO = {"small_mlp": small_mlp, "small_cnn": small_cnn, "conv_zoo": conv_zoo, "token_net": token_net, "tied": tied}
