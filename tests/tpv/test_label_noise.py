"""Label-noise TPV on a linear model, where it is sigma^2 x^T X^T (X X^T)^-2 X x, and on an MLP."""

import pytest
import torch
from torch import nn

import valfree
from valfree.errors import ValfreeError
from valfree.tpv import LabelNoise

SIGMA = 0.3


def _linear(d: int, k: int = 1) -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(d, k, bias=False).double()


def _data(n, d, seed):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_closed_form_equals_the_direct_linear_formula():
    x_train, x_test = _data(20, 50, 0), _data(30, 50, 1)
    gram_inv = torch.linalg.inv(x_train @ x_train.T)
    proj = x_train.T @ gram_inv @ gram_inv @ x_train
    direct = SIGMA**2 * float(torch.einsum("md,de,me->m", x_test, proj, x_test).mean())
    est = valfree.tpv(_linear(50), x_test, LabelNoise(SIGMA, inputs=x_train))
    assert est.method == "closed_form" and est.stderr == 0
    assert est.value == pytest.approx(direct, rel=1e-8)
    # Several outputs: the Jacobian is block-diagonal, so the value is K times the scalar one.
    assert valfree.tpv(_linear(50, 3), x_test, LabelNoise(SIGMA, inputs=x_train)).value == pytest.approx(3 * direct, rel=1e-8)


def test_closed_form_over_isotropic_test_inputs_is_sigma2_tr_gram_inverse():
    x_train = _data(20, 50, 2)
    est = valfree.tpv(_linear(50), _data(4000, 50, 3), LabelNoise(SIGMA, inputs=x_train))
    expected = SIGMA**2 * float(torch.trace(torch.linalg.inv(x_train @ x_train.T)))
    assert abs(est.value - expected) < 4 * est.input_stderr


def test_training_inputs_give_sigma2_rank_over_n():
    x_train = _data(20, 50, 4)
    est = valfree.tpv(_linear(50, 2), x_train, LabelNoise(SIGMA))
    assert est.value == pytest.approx(SIGMA**2 * 2 * 20 / 20, rel=1e-8)


def test_fine_tuning_matches_the_closed_form_within_its_stderr():
    x_train, x_test = _data(12, 30, 5), _data(40, 30, 6)
    model = _linear(30, 2)
    closed = valfree.tpv(model, x_test, LabelNoise(SIGMA, inputs=x_train))
    tuned = valfree.tpv(model, x_test, LabelNoise(SIGMA, inputs=x_train), "monte_carlo", probes=24, seed=1, proximity=1e-8)
    assert tuned.method == "fine_tune" and tuned.stderr > 0
    assert abs(tuned.value - closed.value) < 4 * tuned.stderr, (tuned, closed)
    # The model is back where it was.
    assert torch.equal(model.weight, _linear(30, 2).weight)


def test_mlp_closed_form_agrees_with_fine_tuning_for_small_sigma():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 40), nn.Tanh(), nn.Linear(40, 2)).double()
    x_train, x_test = _data(10, 6, 7), _data(20, 6, 8)
    noise = LabelNoise(1e-3, inputs=x_train)
    closed = valfree.tpv(model, x_test, noise)
    tuned = valfree.tpv(model, x_test, noise, "monte_carlo", probes=12, seed=2, proximity=1e-10, steps=200)
    assert abs(tuned.value - closed.value) < 4 * tuned.stderr, (tuned, closed)


def test_closed_form_refuses_jacobians_over_the_size_limit():
    with pytest.raises(ValfreeError, match="above the limit of 1e"):
        valfree.tpv(_linear(50), _data(30, 50, 0), "label:0.1", max_elements=1000)
