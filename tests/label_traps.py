"""Labels that raise as soon as anything reads them: proof that a label-free code path stays label-free."""

import torch
from torch.utils.data import Dataset


class LabelTrap:
    """A label that raises as soon as anything reads it."""

    def _touched(self, *args, **kwargs):
        raise AssertionError("a true label was read")

    __int__ = __index__ = __float__ = __len__ = __iter__ = __getitem__ = __array__ = __eq__ = _touched
    __hash__ = None

    def __getattr__(self, name):
        self._touched()


class InputsWithTrappedLabels(Dataset):
    """(input, LabelTrap()) pairs over the rows of ``x``."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], LabelTrap()
