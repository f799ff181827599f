"""Fixtures of the command tests: the small trained digits CNN of the pruning tests (which ``valfree
prune`` is checked against) and a private copy of the digits trajectory to score."""

import shutil

import pytest

from tests.pruning.conftest import digits, trained_cnn, trained_cnn_state  # noqa: F401


@pytest.fixture
def run_dir(tmp_path, digits_trajectory):
    """A copy of the digits trajectory's checkpoints that a test may add files to."""
    folder, _ = digits_trajectory
    dst = tmp_path / "ckpts"
    shutil.copytree(folder, dst)
    return dst
