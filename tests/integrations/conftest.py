"""Shared settings for the integration tests."""

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    """The models here are tiny: a second intra-op thread only adds synchronisation, and on a loaded
    2-core machine OpenMP spin-waiting made a tiny BERT step 20x slower. Restored after each test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
