"""Small trained models shared by the pruning tests (trained once per session, seeded)."""

import pytest
import torch
import torch.nn.functional as F

from valfree.io import load_dataset
from valfree.models import cnn


def train(model, x, y, epochs, lr=1e-2, batch_size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), batch_size):
            idx = order[i:i + batch_size]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return model.eval()


@pytest.fixture(scope="session")
def digits():
    return load_dataset("digits", "train"), load_dataset("digits", "test")


@pytest.fixture(scope="session")
def trained_cnn_state(digits):
    """State dict of a 16-channel CNN (Conv-BN-ReLU x3, fc) trained on digits (~98 % test accuracy)."""
    torch.manual_seed(0)
    x, y = digits[0].tensors
    return train(cnn(in_size=8, width=16), x, y, epochs=6).state_dict()


@pytest.fixture
def trained_cnn(trained_cnn_state):
    model = cnn(in_size=8, width=16)
    model.load_state_dict(trained_cnn_state)
    return model.eval()
