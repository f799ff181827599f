"""TPV stability: does the training-set TPV stand in for the test-set TPV? No labels are used.

The paper's stability theorem bounds |TPV(X_tr) - TPV(X_te)| by a term that does not involve the
generalisation gap, so a model's training inputs suffice to estimate its test-time sensitivity. This
module measures both on the same noise (whose training-data-dependent parts, SGD curvature and the
label-noise refit, are bound to the training inputs) and reports their ratio with a confidence interval
built from the input-level standard errors (delta method on log ratio).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from scipy import stats

from ..batches import pad_token_id
from .estimate import TPVEstimate
from .estimators import as_inputs, tpv
from .noise import LabelNoise, NoiseModel, SGDNoise, parse_noise

#: Ratios within [1/STABLE_BAND, STABLE_BAND] count as "the training set stands in for the test set".
STABLE_BAND = 1.25


@dataclass
class Stability:
    """Training-set and test-set TPV, their ratio train/test with a confidence interval, and a verdict.

    ``verdict`` is ``"stable"`` when the whole interval lies within [0.8, 1.25], ``"unstable"`` when it
    lies wholly outside, and ``"inconclusive"`` otherwise; ``message`` says it in a sentence.
    """

    train: TPVEstimate
    test: TPVEstimate
    ratio: float
    ratio_low: float
    ratio_high: float
    level: float
    verdict: str
    message: str

    def as_dict(self) -> dict:
        row = {f"train_{k}": v for k, v in self.train.as_dict().items()}
        row.update({f"test_{k}": v for k, v in self.test.as_dict().items() if k in ("value", "stderr", "input_stderr", "n_inputs", "seconds")})
        row.update(ratio=self.ratio, ratio_low=self.ratio_low, ratio_high=self.ratio_high, level=self.level, verdict=self.verdict)
        return row

    def __str__(self) -> str:
        return self.message


def ratio_interval(train: TPVEstimate, test: TPVEstimate, level: float = 0.95) -> tuple[float, float, float]:
    """train/test with a normal interval on the log ratio, from the input-level standard errors.

    Var(log ratio) ~= (se_tr / tr)^2 + (se_te / te)^2 - 2 cov / (tr te). The covariance is non-zero when
    both estimates averaged over the same draws (same seed; Monte Carlo dw or SGD probes): it is then
    Cov_r(a_r, b_r) / R over the per-draw means, and the shared draw noise largely cancels in the ratio.
    """
    if train.value <= 0 or test.value <= 0:
        return math.nan, math.nan, math.nan
    ratio = train.value / test.value
    var = (train.input_stderr / train.value) ** 2 + (test.input_stderr / test.value) ** 2
    a, b = train.per_draw, test.per_draw
    if a is not None and b is not None and len(a) == len(b) > 1:
        cov = float(((a - a.mean()) * (b - b.mean())).sum()) / (len(a) - 1) / len(a)
        var -= 2 * cov / (train.value * test.value)
    se = math.sqrt(max(var, 0.0))
    z = float(stats.norm.ppf(0.5 + level / 2))
    return ratio, ratio * math.exp(-z * se), ratio * math.exp(z * se)


def verdict(low: float, high: float, band: float = STABLE_BAND) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "inconclusive"
    if 1 / band <= low and high <= band:
        return "stable"
    if high < 1 / band or low > band:
        return "unstable"
    return "inconclusive"


def _message(v: str, ratio: float, low: float, high: float, level: float) -> str:
    head = f"train/test TPV = {ratio:.3g} ({level:.0%} CI {low:.3g}-{high:.3g})"
    if v == "stable":
        return f"{head}: stable, the training inputs stand in for the test inputs within {STABLE_BAND - 1:.0%}."
    if v == "unstable":
        side = "over" if low > 1 else "under"
        return f"{head}: unstable, the training inputs {side}state the test TPV; do not rank models by training-set TPV here."
    return f"{head}: inconclusive, the interval is too wide to tell; use more inputs or probes."


def tpv_stability(model, train_inputs, test_inputs, noise: "NoiseModel | str", method: str = "trace", *, level: float = 0.95, **kwargs) -> Stability:
    """TPV on training inputs and on test inputs under the same noise, their ratio and a verdict.

    Only inputs are read: a (inputs, labels) pair, a Dataset or a DataLoader has its labels ignored.
    Other keyword arguments go to :func:`valfree.tpv` (``probes``, ``seed``, ``outputs``...).
    """
    noise = parse_noise(noise)
    pad = pad_token_id(model)
    x_train = as_inputs(train_inputs, "train_inputs", pad)
    x_test = as_inputs(test_inputs, "test_inputs", pad)
    if isinstance(noise, (SGDNoise, LabelNoise)):
        # The noise comes from training on the training set, whichever inputs it is measured on.
        noise = noise.bind(x_train, kwargs.get("targets"))
    train = tpv(model, x_train, noise, method, **kwargs)
    test = tpv(model, x_test, noise, method, **kwargs)
    ratio, low, high = ratio_interval(train, test, level)
    v = verdict(low, high)
    return Stability(train, test, ratio, low, high, level, v, _message(v, ratio, low, high, level))
