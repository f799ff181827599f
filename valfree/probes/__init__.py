"""Pure tensor maths of the head-gradient probe: head discovery, the closed form, readouts, and the
dense, multi-head, diffusion and language-model variants built on the same residual and Gram/direct
product."""

from .diffusion import ddpm_alphas_cumprod, diffusion_head_gradient, noised_batch
from .forward import capture_forward
from .head_gradient import (
    HeadGradient,
    gram_is_cheaper,
    head_gradient,
    head_gradient_from_features,
    probe_features,
    probe_model,
    residual,
    weight_grad_norm_sq,
)
from .heads import Head, capture_head, find_head, is_linear_head
from .language import LMHeadGradient, lm_head_gradient, lm_head_gradient_from_features, lm_probe_memory
from .losses import centernet_focal_loss
from .multi_head import MultiHeadGradient, combine, head_gradients
from .options import ProbeOptions
from .readouts import sigmoid_readouts, softmax_readouts
from .rows import LOSSES

__all__ = [
    "Head",
    "HeadGradient",
    "LMHeadGradient",
    "LOSSES",
    "MultiHeadGradient",
    "ProbeOptions",
    "capture_forward",
    "capture_head",
    "centernet_focal_loss",
    "combine",
    "ddpm_alphas_cumprod",
    "diffusion_head_gradient",
    "find_head",
    "gram_is_cheaper",
    "head_gradient",
    "head_gradient_from_features",
    "head_gradients",
    "is_linear_head",
    "lm_head_gradient",
    "lm_head_gradient_from_features",
    "lm_probe_memory",
    "noised_batch",
    "probe_features",
    "probe_model",
    "residual",
    "sigmoid_readouts",
    "softmax_readouts",
    "weight_grad_norm_sq",
]
