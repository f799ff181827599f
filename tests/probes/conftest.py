import pytest
import torch


@pytest.fixture(autouse=True)
def float64_default():
    """Formula checks run in float64; the previous default dtype is restored for other test folders."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)
