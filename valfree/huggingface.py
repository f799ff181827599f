"""``valfree.huggingface``: the label-free Trainer callback (imports transformers)."""

from .integrations.huggingface import *  # noqa: F401,F403
from .integrations.huggingface import __all__  # noqa: F401
