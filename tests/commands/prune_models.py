"""A model factory for the command-line tests (``--model tests/pruning/models_for_cli.py:tiny_digits_cnn``)."""

from valfree.models import cnn


def tiny_digits_cnn():
    return cnn(in_size=8, width=16)
