"""Presets: how each kind of model turns one probe batch (inputs x, labels y, as a data spec yields
them) into a probe call, and which direction of the score selection should take.

| preset | head(s) | x | y | loss |
|---|---|---|---|---|
| classification | found | inputs | class indices | ce |
| segmentation | found (a 1x1 conv) | images | per-pixel class masks (B, H, W); 255 and -100 ignored | ce per pixel |
| centernet | ``heatmap,box`` (override with ``head``) | images | (B, C + K, H', W'): C heatmap channels, then K box channels, NaN where there is no object | focal + 0.1 L1, joint gradient |
| diffusion-eps, diffusion-v | found (the 1x1 last layer) | clean images | unused | MSE of the epsilon / v prediction at seeded timesteps and noise |
| lm | ``lm_head`` | token ids (B, T) | an attention mask (B, T) when given, else unused | next-token ce |

``mode`` is the direction in which the probe's ``grad_norm`` tracks quality *as measured on our
benchmarks* (benchmarks/results/beyond_*.json, docs/beyond.md), not assumed: ``"min"`` where a smaller
probe went with a better held-out metric. The diffusion presets read the noise schedule from the
model's ``alphas_cumprod`` attribute or buffer when it has one, else DDPM's linear schedule (1000
steps, beta 1e-4 to 0.02).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..errors import ValfreeError
from .diffusion import ddpm_alphas_cumprod, diffusion_head_gradient
from .head_gradient import head_gradient
from .heads import find_head
from .language import lm_head_gradient
from .multi_head import head_gradients

CENTERNET_BOX_WEIGHT = 0.1  # CenterNet's lambda_size
CENTERNET_HEADS = ("heatmap", "box")


@dataclass(frozen=True)
class Preset:
    """A named recipe: ``probe(model, x, y, head, seed)`` returns a probe result; ``mode`` is the
    measured selection direction of ``grad_norm``; ``evidence`` says where it was measured."""

    name: str
    loss: str
    mode: str
    evidence: str
    run: Callable
    needs_labels: bool = True
    default_heads: tuple[str, ...] = ()

    def probe(self, model: nn.Module, inputs, targets, head: str | None = None, seed: int = 0):
        return self.run(model, inputs, targets, head, seed)

    def check_heads(self, model: nn.Module, head: str | None = None) -> None:
        """Raise a :class:`ValfreeError` now if the preset's head(s) are missing or not per-location linear."""
        names = head.split(",") if head and "," in head else ([head] if head or not self.default_heads else list(self.default_heads))
        for name in names:
            find_head(model, name.strip() if name else None)


def _classification(model, x, y, head, seed):
    return head_gradient(model, x, y, head=head, loss="ce")


def _segmentation(model, x, y, head, seed):
    if isinstance(y, str):
        return head_gradient(model, x, y, head=head, loss="ce")
    if y.is_floating_point() or y.dim() < 2:
        raise ValfreeError(
            f"the segmentation preset needs integer per-pixel class masks (batch, H, W) as labels, got shape "
            f"{tuple(y.shape)} {y.dtype}."
        )
    y = y.long().clone()
    y[y == 255] = -100  # the VOC/Cityscapes "void" label
    return head_gradient(model, x, y, head=head, loss="ce", ignore_index=-100)


def _centernet(model, x, y, head, seed):
    names = [n.strip() for n in (head or ",".join(CENTERNET_HEADS)).split(",")]
    if len(names) != 2:
        raise ValfreeError(f"the centernet preset needs two heads, heatmap then box (--head heatmap,box), got {head!r}.")
    if isinstance(y, str) or not y.is_floating_point():
        raise ValfreeError(
            "the centernet preset needs float targets (batch, C + K, H, W): C heatmap channels, then K box channels "
            "with NaN where there is no object; pseudo targets cannot supply box sizes."
        )
    c = find_head(model, names[0]).weight.shape[0]
    k = find_head(model, names[1]).weight.shape[0]
    if y.dim() != 4 or y.shape[1] != c + k:
        raise ValfreeError(
            f"the centernet preset needs targets of shape (batch, {c} + {k}, H, W) for heads {names[0]!r} ({c} outputs) "
            f"and {names[1]!r} ({k} outputs), got {tuple(y.shape)}."
        )
    return head_gradients(model, x, {names[0]: y[:, :c], names[1]: y[:, c:]}, {names[0]: "focal", names[1]: "l1"},
                          {names[1]: CENTERNET_BOX_WEIGHT})


def schedule_of(model: nn.Module) -> torch.Tensor:
    ab = getattr(model, "alphas_cumprod", None)
    return ab if isinstance(ab, torch.Tensor) else ddpm_alphas_cumprod()


def _diffusion(prediction: str):
    def run(model, x, y, head, seed):
        if not x.is_floating_point():
            raise ValfreeError(f"the diffusion presets need float images as inputs, got {x.dtype}.")
        return diffusion_head_gradient(model, x, schedule_of(model), head=head, prediction=prediction, seed=seed)

    return run


def _lm(model, x, y, head, seed):
    if x.is_floating_point() or x.dim() != 2:
        raise ValfreeError(f"the lm preset needs integer token ids of shape (batch, length) as inputs, got {tuple(x.shape)} {x.dtype}.")
    mask = y if isinstance(y, torch.Tensor) and y.shape == x.shape else None
    return lm_head_gradient(model, x, mask, head=head)


_EVIDENCE = "benchmarks/results/beyond_{}.json (docs/beyond.md)"

# Each mode is the sign we measured (Spearman rho of grad_norm against the held-out metric over a
# training trajectory, docs/beyond.md): "min" wherever a smaller probe went with a better model.
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        # The paper's sign, and the core's measured digits / Fashion-MNIST trajectories (docs/guide.md).
        Preset("classification", "ce", "min", "the paper; tests/commands/test_score_select_report.py", _classification),
        Preset("segmentation", "ce", "min", _EVIDENCE.format("segmentation") + ": rho -0.91 with test mIoU",
               _segmentation),
        Preset("centernet", "focal+l1", "min", _EVIDENCE.format("detection") + ": rho -0.87 with test mAP@0.5",
               _centernet, default_heads=CENTERNET_HEADS),
        # Not the reversed sign the paper reports for DDPM on CIFAR-10: on our tiny DDPM a smaller probe
        # went with lower held-out MSE and lower classifier FID for every probe batch and seed we tried.
        Preset("diffusion-eps", "mse", "min", _EVIDENCE.format("diffusion") + " and beyond_diffusion_probe_batch.json",
               _diffusion("epsilon"), needs_labels=False),
        Preset("diffusion-v", "mse", "min", _EVIDENCE.format("diffusion_v"), _diffusion("v"), needs_labels=False),
        # Measured where the LM sees its corpus about 1.7 times (rho +0.77 with held-out perplexity); on a
        # corpus seen ~38 times the training-batch probe keeps falling while perplexity rises (rho -0.63).
        Preset("lm", "ce", "min", _EVIDENCE.format("language_stdlib") + "; reversed when overfitting: beyond_language.json",
               _lm, needs_labels=False),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValfreeError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}.") from None
