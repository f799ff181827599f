"""``valfree.lightning``: label-free checkpointing and early stopping for Lightning (imports lightning)."""

from .integrations.lightning import *  # noqa: F401,F403
from .integrations.lightning import __all__  # noqa: F401
