"""Model selection by training-set TPV: rank candidates, and find the TPV peak along a trajectory.

Lower TPV under a fixed noise means predictions that move less under that perturbation; among models
that fit their training data, the paper finds it tracks test loss. Along a training run TPV rises while
the model starts fitting and falls again in the (epoch-wise) double-descent phase: the argmax-TPV
checkpoint separates the two, so it is reported with its value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from torch import nn

from ..batches import pad_token_id
from .estimate import TPVEstimate
from .estimators import as_inputs, tpv
from .noise import LabelNoise, NoiseModel, SGDNoise, parse_noise


@dataclass
class Ranked:
    """One candidate in a ranking: its name, rank (1 = lowest TPV) and estimate."""

    rank: int
    name: str
    estimate: TPVEstimate
    #: True when its interval overlaps the next candidate's, so the order between them is not resolved.
    tied_with_next: bool = False


def _interval_overlap(a: TPVEstimate, b: TPVEstimate, z: float = 1.96) -> bool:
    return a.value + z * a.input_stderr >= b.value - z * b.input_stderr


def rank_models(
    models: "Mapping[str, nn.Module] | Iterable[nn.Module]", inputs, noise: "NoiseModel | str", method: str = "trace", **kwargs
) -> list[Ranked]:
    """Rank candidate models (or one architecture trained with several recipes) by TPV on the same inputs.

    ``models`` is a mapping name -> model (or a list, named by position). Returns the candidates from
    lowest to highest TPV; ``tied_with_next`` flags neighbours whose 95% intervals (over inputs) overlap.
    Keyword arguments go to :func:`valfree.tpv`.
    """
    items = list(models.items()) if isinstance(models, Mapping) else [(str(i), m) for i, m in enumerate(models)]
    # The candidates read the same inputs, so one tokenizer: the first model's pad token pads them.
    x = as_inputs(inputs, pad_token_id=pad_token_id(items[0][1]) if items else 0)
    noise = parse_noise(noise)
    if isinstance(noise, (SGDNoise, LabelNoise)):
        noise = noise.bind(x, kwargs.get("targets"))
    estimates = [(name, tpv(model, x, noise, method, **kwargs)) for name, model in items]
    estimates.sort(key=lambda item: item[1].value)
    ranked = [Ranked(i + 1, name, est) for i, (name, est) in enumerate(estimates)]
    for a, b in zip(ranked, ranked[1:]):
        a.tied_with_next = _interval_overlap(a.estimate, b.estimate)
    return ranked


@dataclass
class Trajectory:
    """TPV along a run: ``steps``, ``estimates``, and the argmax-TPV point.

    ``peak_interior`` is True when the peak is neither the first nor the last checkpoint, i.e. the run
    shows the rise-then-fall the paper uses to separate under-fitting from the double-descent phase.
    """

    steps: list[int]
    estimates: list[TPVEstimate]
    peak_index: int
    peak_step: int
    peak_interior: bool
    failures: list[tuple[int, str]] = field(default_factory=list)

    @property
    def values(self) -> list[float]:
        return [e.value for e in self.estimates]

    def as_rows(self) -> list[dict]:
        return [{"step": s, **e.as_dict()} for s, e in zip(self.steps, self.estimates)]


def peak(steps: list[int], values: list[float]) -> tuple[int, int, bool]:
    """(index, step, interior) of the largest finite value."""
    finite = [(v, i) for i, v in enumerate(values) if math.isfinite(v)]
    if not finite:
        return -1, -1, False
    _, i = max(finite)
    return i, steps[i], 0 < i < len(values) - 1


def tpv_trajectory(
    checkpoints: "Iterable[tuple[int, nn.Module]] | Iterable[tuple[int, Callable[[], nn.Module]]]",
    inputs,
    noise: "NoiseModel | str",
    method: str = "trace",
    **kwargs,
) -> Trajectory:
    """TPV of each checkpoint of a run on the same inputs, and the argmax-TPV step.

    ``checkpoints`` yields (step, model) pairs, or (step, loader) pairs whose loader returns the model
    when called, so that only one checkpoint is in memory at a time. Keyword arguments go to
    :func:`valfree.tpv`; each checkpoint uses the same seed, so differences are not probe noise.
    """
    noise = parse_noise(noise)
    x = None
    steps, estimates = [], []
    for step, item in checkpoints:
        model = item if isinstance(item, nn.Module) else item()
        if x is None:  # batched once, with the first checkpoint's pad token (one tokenizer for the run)
            x = as_inputs(inputs, pad_token_id=pad_token_id(model))
            if isinstance(noise, (SGDNoise, LabelNoise)):
                noise = noise.bind(x, kwargs.get("targets"))
        steps.append(int(step))
        estimates.append(tpv(model, x, noise, method, **kwargs))
    i, step, interior = peak(steps, [e.value for e in estimates])
    return Trajectory(steps, estimates, i, step, interior)
