"""Shared fixtures: a real (small) training trajectory of digits checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import Subset

from valfree.commands.demo import train_with_checkpoints
from valfree.io.data import load_dataset
from valfree.models import digits_cnn


@pytest.fixture(scope="session")
def digits_trajectory(tmp_path_factory):
    """A digits CNN trained for 6 short epochs: 12 state_dict checkpoints named step_XXXXXX.pt."""
    folder = tmp_path_factory.mktemp("digits_run") / "checkpoints"
    torch.manual_seed(0)
    train = load_dataset("digits", "train")
    model = digits_cnn()
    paths = train_with_checkpoints(model, Subset(train, range(768)), folder, epochs=6, batch_size=64,
                                   checkpoints_per_epoch=2, lr=0.05, log=lambda *_: None)
    return folder, paths
