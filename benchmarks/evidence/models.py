"""Model families the benchmark needs beyond valfree.models (kept here, not in the library)."""

from __future__ import annotations

from torch import nn


def mlp_bn(num_classes: int = 10, in_size: int = 28, width: int = 256, depth: int = 2) -> nn.Module:
    """valfree.models.mlp with BatchNorm1d after each hidden Linear: Flatten, (Linear, BN, ReLU) x depth, ``fc``."""
    layers: list[nn.Module] = [nn.Flatten()]
    d = in_size * in_size
    for _ in range(depth):
        layers += [nn.Linear(d, width, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
        d = width
    model = nn.Sequential(*layers)
    model.add_module("fc", nn.Linear(d, num_classes))
    return model


LOCAL_FACTORIES = {"mlp_bn": mlp_bn}
