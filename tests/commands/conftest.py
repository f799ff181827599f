"""The small trained digits CNN of the pruning tests, which ``valfree prune`` is checked against."""

from tests.pruning.conftest import digits, trained_cnn, trained_cnn_state  # noqa: F401
