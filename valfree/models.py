"""Small reference models for single-channel images (Fashion-MNIST 28x28, digits 8x8).

They serve the demo, the tests and the benchmarks, and are valid ``--model`` factories, e.g.
``--model valfree.models:cnn``. Each takes ``num_classes`` and ``in_size`` so that the same factory fits
either data set. They are deliberately small enough to train on two CPU cores.
"""

from __future__ import annotations

import torch
from torch import nn


def mlp(num_classes: int = 10, in_size: int = 28, width: int = 256, depth: int = 2) -> nn.Module:
    """Flatten, then ``depth`` hidden ReLU layers of ``width``, then the ``fc`` head."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_size * in_size
    for _ in range(depth):
        layers += [nn.Linear(d, width), nn.ReLU()]
        d = width
    model = nn.Sequential(*layers)
    model.add_module("fc", nn.Linear(d, num_classes))
    return model


class CNN(nn.Module):
    """Two conv-BN-ReLU-pool blocks, global average pooling and an ``fc`` head."""

    def __init__(self, num_classes: int = 10, in_size: int = 28, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.MaxPool2d(2) if in_size >= 16 else nn.Identity(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def cnn(num_classes: int = 10, in_size: int = 28, width: int = 32) -> nn.Module:
    return CNN(num_classes, in_size, width)


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    """A three-stage residual network (one BasicBlock per stage) with an ``fc`` head."""

    def __init__(self, num_classes: int = 10, in_size: int = 28, width: int = 16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        stride = 2 if in_size >= 16 else 1
        self.layer1 = BasicBlock(width, width)
        self.layer2 = BasicBlock(width, 2 * width, stride)
        self.layer3 = BasicBlock(2 * width, 4 * width, stride)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet(num_classes: int = 10, in_size: int = 28, width: int = 16) -> nn.Module:
    return ResNet(num_classes, in_size, width)


class ViT(nn.Module):
    """A small vision transformer: patch embedding, pre-norm encoder blocks, mean pooling, ``head``."""

    def __init__(self, num_classes: int = 10, in_size: int = 28, patch: int = 7, dim: int = 64, depth: int = 2, heads: int = 4):
        super().__init__()
        if in_size % patch:
            patch = 4 if in_size % 4 == 0 else 2
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        n_patches = (in_size // patch) ** 2
        self.pos = nn.Parameter(torch.zeros(1, n_patches, dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos
        return self.head(self.norm(self.encoder(tokens)).mean(1))


def vit(num_classes: int = 10, in_size: int = 28, dim: int = 64, depth: int = 2) -> nn.Module:
    return ViT(num_classes, in_size, dim=dim, depth=depth)


FAMILIES = {"mlp": mlp, "cnn": cnn, "resnet": resnet, "vit": vit}


def digits_cnn() -> nn.Module:
    """The CNN sized for scikit-learn's 8x8 digits (a ready ``--model`` factory)."""
    return cnn(num_classes=10, in_size=8)
