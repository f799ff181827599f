"""The trace and Monte Carlo estimators against exact Tr(H_eff C) from dense per-sample Jacobians."""

import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import valfree
from valfree.tpv import Isotropic, Pruning, Quantization

from . import oracle, zoo

N = 24
NOISES = [Isotropic(0.01), Quantization(8, "tensor"), Quantization(4, "channel"), Quantization(6, "global")]


@pytest.fixture(scope="module")
def cases():
    """Models with their inputs and dense per-sample Jacobians, computed once."""
    out = {}
    for name, build, x in [
        ("mlp", zoo.fm_mlp, zoo.inputs_for("mlp", N)),
        ("cnn", zoo.small_cnn, zoo.inputs_for("cnn", N)),
    ]:
        model = build().eval()
        out[name] = (model, x, oracle.dense_jacobians(model, x))
    return out


def _params(model):
    return {k: p.detach() for k, p in model.named_parameters()}


@pytest.mark.parametrize("noise", NOISES, ids=str)
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_trace_is_within_four_stderr_of_the_exact_value(cases, name, noise):
    model, x, jac = cases[name]
    exact = oracle.exact_diagonal_tpv(jac, noise.variances(_params(model)))
    est = valfree.tpv(model, x, noise, probes=8, seed=1)
    assert est.stderr > 0
    assert abs(est.value - exact) < 4 * est.stderr, (est, exact)
    assert est.rel_stderr < 0.1  # and the error bar is informative, not huge
    library_exact = valfree.tpv(model, x, noise, method="exact")
    assert library_exact.stderr == 0 and library_exact.input_stderr > 0
    assert library_exact.value == pytest.approx(exact, rel=1e-9)


def test_stderr_shrinks_as_one_over_sqrt_probes(cases):
    model, x, _ = cases["mlp"]
    few = valfree.tpv(model, x, Isotropic(0.01), probes=4, seed=2)
    many = valfree.tpv(model, x, Isotropic(0.01), probes=64, seed=3)
    assert few.stderr / many.stderr == pytest.approx(math.sqrt(64 / 4), rel=0.25)


def test_stderr_is_calibrated_over_seeds():
    """Across 40 seeds the mean squared error about the exact value matches the mean stderr^2.

    (A ratio of 1 within sampling error: the squared errors of 40 runs give it to about +-25 %.)
    """
    model = zoo.small_mlp().eval()
    x = zoo.inputs_for("small_mlp", 32)
    exact = oracle.exact_diagonal_tpv(oracle.dense_jacobians(model, x), Isotropic(1.0).variances(_params(model)))
    errors, variances = [], []
    for seed in range(40):
        est = valfree.tpv(model, x, "iso:1", probes=4, seed=seed)
        errors.append((est.value - exact) ** 2)
        variances.append(est.stderr**2)
    ratio = sum(errors) / sum(variances)
    assert 0.55 < ratio < 1.6, ratio


def test_probabilities_and_custom_outputs(cases):
    model, x, _ = cases["cnn"]
    softmax = lambda t: torch.softmax(t, -1)  # noqa: E731
    first_two = lambda t: t[:, :2]  # noqa: E731
    for outputs, fn in [("probs", softmax), (first_two, first_two)]:
        jac = oracle.dense_jacobians(model, x[:12], fn)
        exact = oracle.exact_diagonal_tpv(jac, Isotropic(0.1).variances(_params(model)))
        est = valfree.tpv(model, x[:12], "iso:0.1", outputs=outputs, probes=16, seed=4)
        assert abs(est.value - exact) < 4 * est.stderr


def test_monte_carlo_agrees_at_small_sigma_and_parts_as_sigma_grows():
    model = zoo.small_mlp().eval()
    x = zoo.inputs_for("small_mlp", 64)
    gaps = []
    for sigma in (1e-3, 0.3, 3.0):
        trace = valfree.tpv(model, x, Isotropic(sigma), probes=16, seed=5, outputs="probs")
        mc = valfree.tpv(model, x, Isotropic(sigma), "monte_carlo", probes=64, seed=6, outputs="probs")
        band = math.hypot(trace.stderr, mc.stderr)
        gaps.append((abs(mc.value - trace.value) / band, abs(mc.value / trace.value - 1)))
    assert gaps[0][0] < 3  # first order holds: agreement within the combined 3-stderr band
    assert gaps[2][0] > 10 and gaps[2][1] > 0.5  # probabilities saturate; the first-order value keeps growing
    assert gaps[0][1] < gaps[1][1] < gaps[2][1]


def test_pruning_first_order_is_exact_and_monte_carlo_is_the_direct_change(cases):
    model, x, jac = cases["mlp"]
    mask = {"1.weight": torch.zeros(16, 64, dtype=torch.bool)}
    mask["1.weight"][:, :3] = True
    noise = Pruning(mask)
    dw = torch.cat([(-model.get_parameter("1.weight").detach() * mask["1.weight"]).reshape(-1) if k == "1.weight"
                    else torch.zeros_like(p).reshape(-1) for k, p in model.named_parameters()])
    expected = float((oracle.flat(jac) @ dw).square().sum(1).mean())
    est = valfree.tpv(model, x, noise)
    assert est.method == "jvp" and est.stderr == 0
    assert est.value == pytest.approx(expected, rel=1e-10)
    with torch.no_grad():
        pruned = zoo.fm_mlp().eval()
        pruned.get_parameter("1.weight")[mask["1.weight"]] = 0
        direct = float((pruned(x) - model(x)).square().sum(1).mean())
    mc = valfree.tpv(model, x, noise, "monte_carlo")
    assert mc.value == pytest.approx(direct, rel=1e-10)


def test_rtol_adds_probes_until_the_target_is_met(cases):
    model, x, _ = cases["mlp"]
    est = valfree.tpv(model, x, "iso:0.01", probes=2, rtol=0.01, seed=0)
    assert est.rel_stderr <= 0.01 and est.probes > 2
    capped = valfree.tpv(model, x, "iso:0.01", probes=2, rtol=1e-6, max_probes=5, seed=0)
    assert capped.probes == 5 and capped.rel_stderr > 1e-6


def test_train_mode_and_batchnorm_statistics_are_left_untouched():
    model = zoo.small_cnn().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = zoo.inputs_for("small_cnn", 8)
    valfree.tpv(model, x, "quant:8", probes=2)
    valfree.tpv(model, x, "quant:8", "monte_carlo", probes=4)
    assert model.training and all(m.training for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_datasets_and_loaders_give_the_same_value_and_labels_are_not_needed(cases):
    model, x, _ = cases["mlp"]
    labels = torch.zeros(N, dtype=torch.long)
    a = valfree.tpv(model, x, "iso:0.01", probes=2, seed=7)
    b = valfree.tpv(model, TensorDataset(x, labels), "iso:0.01", probes=2, seed=7)
    c = valfree.tpv(model, DataLoader(TensorDataset(x, labels), batch_size=5), "iso:0.01", probes=2, seed=7)
    d = valfree.tpv(model, (x, labels), "iso:0.01", probes=2, seed=7)
    assert a.value == b.value == c.value == d.value
    assert set(a.as_dict()) >= {"value", "stderr", "input_stderr", "probes", "seconds", "method", "noise", "n_inputs"}


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_vit_and_resnet_attention_residuals_and_layernorm(family):
    """Attention weights used through F.multi_head_attention_forward and the bare 'pos' take the fallback."""
    from valfree.models import resnet, vit

    torch.manual_seed(0)
    model = (vit(in_size=8, dim=16, depth=1) if family == "vit" else resnet(in_size=8, width=4)).double().eval()
    x = zoo.inputs_for("cnn", 10)
    noise = Quantization(8, "channel")
    exact = oracle.exact_diagonal_tpv(oracle.dense_jacobians(model, x), noise.variances(_params(model)))
    est = valfree.tpv(model, x, noise, probes=16, seed=8)
    assert abs(est.value - exact) < 4 * est.stderr and est.rel_stderr < 0.1
