"""Pure tensor maths of the head-gradient probe: head discovery, the closed form, readouts."""

from .head_gradient import (
    HeadGradient,
    gram_is_cheaper,
    head_gradient,
    head_gradient_from_features,
    residual,
    weight_grad_norm_sq,
)
from .heads import Head, capture_head, find_head, is_linear_head
from .readouts import sigmoid_readouts, softmax_readouts

__all__ = [
    "Head",
    "HeadGradient",
    "capture_head",
    "find_head",
    "gram_is_cheaper",
    "head_gradient",
    "head_gradient_from_features",
    "is_linear_head",
    "residual",
    "sigmoid_readouts",
    "softmax_readouts",
    "weight_grad_norm_sq",
]
