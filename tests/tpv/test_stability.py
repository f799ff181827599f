"""Train vs test TPV: ratio, interval and verdict; a small Fashion-MNIST version of the width sweep."""

import math

import pytest
import torch

import valfree
from valfree.io.data import fashion_mnist
from valfree.io.data import inputs_only
from valfree.models import mlp
from valfree.tpv.estimate import TPVEstimate
from valfree.tpv.stability import ratio_interval, verdict

from ..label_traps import InputsWithTrappedLabels
from . import zoo


def _est(value, se):
    return TPVEstimate(value=value, stderr=se, input_stderr=se, probes=4, seconds=0.0, method="trace", noise="iso:1", n_inputs=100)


def test_ratio_interval_is_the_delta_method_on_the_log_ratio():
    ratio, low, high = ratio_interval(_est(2.0, 0.1), _est(1.0, 0.05))
    se = math.hypot(0.05, 0.05)
    assert ratio == 2.0 and low == pytest.approx(2 * math.exp(-1.959964 * se)) and high == pytest.approx(2 * math.exp(1.959964 * se))


@pytest.mark.parametrize("low, high, expected", [(0.9, 1.1, "stable"), (1.4, 1.9, "unstable"), (0.3, 0.7, "unstable"), (0.7, 1.3, "inconclusive")])
def test_verdicts(low, high, expected):
    assert verdict(low, high) == expected


def test_same_distribution_is_stable_and_test_labels_are_never_read():
    model = zoo.fm_mlp().eval()
    g = torch.Generator().manual_seed(0)
    x_train = torch.randn(400, 1, 8, 8, generator=g, dtype=torch.float64)
    x_test = torch.randn(400, 1, 8, 8, generator=g, dtype=torch.float64)
    result = valfree.tpv_stability(model, x_train, InputsWithTrappedLabels(x_test), "quant:8", probes=4)
    assert result.verdict == "stable", result.message
    assert result.ratio_low < 1 < result.ratio_high and "stable" in str(result)
    shifted = valfree.tpv_stability(model, x_train, 3 * x_test, "quant:8", probes=4)
    assert shifted.verdict == "unstable" and shifted.ratio_high < 0.8


def _train(width, x, y, epochs=4, seed=0):
    torch.manual_seed(seed)
    model = mlp(num_classes=10, in_size=28, width=width, depth=1)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for _ in range(epochs):
        for i in range(0, len(x), 128):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[i : i + 128]), y[i : i + 128]).backward()
            opt.step()
    return model.eval()


def test_fashion_mnist_widths_train_tpv_tracks_test_tpv():
    """The small version of benchmarks/tpv_stability.py: two widths, labels of the test split unused."""
    train = fashion_mnist(split="train", limit=2000)
    x, y = train.tensors
    test_inputs = inputs_only(fashion_mnist(split="test", limit=2000), 256, seed=1)
    for width in (16, 64):
        model = _train(width, x, y)
        result = valfree.tpv_stability(model, x[:256], test_inputs, "iso:1e-2", probes=4, seed=0)
        assert result.train.rel_stderr < 0.05 and result.test.rel_stderr < 0.05
        assert 0.67 < result.ratio < 1.5, result.message


def test_shared_draws_are_paired_so_their_noise_cancels_in_the_ratio():
    """SGD probes are drawn from the training data, so train and test estimates with one seed share them."""
    model = zoo.fm_mlp().eval()
    g = torch.Generator().manual_seed(1)
    x_train = torch.randn(300, 1, 8, 8, generator=g, dtype=torch.float64)
    x_test = torch.randn(300, 1, 8, 8, generator=g, dtype=torch.float64)
    paired = valfree.tpv_stability(model, x_train, x_test, "sgd:lr=0.1,batch=32", probes=8, seed=0)
    a, b = paired.train, paired.test
    unpaired_width = math.hypot(a.input_stderr / a.value, b.input_stderr / b.value)
    paired_width = math.log(paired.ratio_high / paired.ratio) / 1.959964
    assert paired_width < 0.5 * unpaired_width
    # The paired interval is honest: over seeds the ratio's spread matches it.
    ratios = [valfree.tpv_stability(model, x_train, x_test, "sgd:lr=0.1,batch=32", probes=8, seed=s).ratio for s in range(8)]
    spread = float(torch.tensor(ratios).log().std())
    assert spread < 2 * paired_width
