"""``MODULE:FACTORY`` entry points with the benchmark's model sizes, for ``valfree score --model``,
e.g. ``valfree score benchmarks/cache/evidence/cnn-clean-s0 --model benchmarks.evidence.factories:cnn``."""

from .config import FAMILIES


def mlp():
    return FAMILIES["mlp"].build(28)


def cnn():
    return FAMILIES["cnn"].build(28)


def resnet():
    return FAMILIES["resnet"].build(28)


def vit():
    return FAMILIES["vit"].build(28)
