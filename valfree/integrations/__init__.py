"""Drop-in training integrations: the plain-loop Monitor, Lightning callbacks, a Hugging Face Trainer
callback, and the torch.distributed pieces they share.

Only torch is imported here. ``valfree.lightning`` and ``valfree.huggingface`` (this package's
``lightning`` and ``huggingface`` modules) import their framework when they are first used.
"""

from .distributed import agree_any, distributed_head_gradient, distributed_head_gradient_from_features
from .monitor import Monitor
from .tracking import Best, ScoreTracker

__all__ = [
    "Best",
    "Monitor",
    "ScoreTracker",
    "agree_any",
    "distributed_head_gradient",
    "distributed_head_gradient_from_features",
]
