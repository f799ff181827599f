"""SGD noise: Hessian-vector products and the SGD TPV against dense Hessians and Gauss-Newton matrices."""

import pytest
import torch
import torch.nn.functional as F

import valfree
from valfree.errors import ValfreeError
from valfree.tpv import SGDNoise
from valfree.tpv.linearize import hessian_vector

from . import oracle, zoo


@pytest.fixture(scope="module")
def setup():
    model = zoo.small_mlp().eval()
    x = zoo.inputs_for("small_mlp", 24)
    y = torch.arange(24) % 3
    hess = oracle.dense_hessian(model, lambda: F.cross_entropy(model(x), y))
    jac = oracle.flat(oracle.dense_jacobians(model, x))
    return model, x, y, hess, jac


def _flat(d):
    return torch.cat([t.reshape(-1) for t in d.values()])


def test_hessian_vector_products_match_the_dense_hessian(setup):
    model, x, y, hess, _ = setup
    g = torch.Generator().manual_seed(0)
    params = {k: p.detach() for k, p in model.named_parameters()}
    v = {k: torch.randn(p.shape, generator=g, dtype=p.dtype) for k, p in params.items()}
    torch.testing.assert_close(_flat(hessian_vector(model, x, y, "ce", v)), hess @ _flat(v), rtol=1e-10, atol=1e-12)


def test_hutchinson_hessian_trace_from_hvps_matches_the_dense_trace(setup):
    model, x, y, hess, _ = setup
    g = torch.Generator().manual_seed(1)
    params = {k: p.detach() for k, p in model.named_parameters()}
    draws = []
    for _ in range(120):
        v = {k: torch.randint(0, 2, p.shape, generator=g).double() * 2 - 1 for k, p in params.items()}
        draws.append(float((_flat(v) * _flat(hessian_vector(model, x, y, "ce", v))).sum()))
    draws = torch.tensor(draws)
    stderr = float(draws.std() / len(draws) ** 0.5)
    assert abs(float(draws.mean()) - float(hess.trace())) < 4 * stderr


def _dense_ggn(model, x, jac):
    p = torch.softmax(model(x).detach(), -1)
    lam = torch.diag_embed(p) - p.unsqueeze(2) * p.unsqueeze(1)
    return torch.einsum("nkp,nkj,njq->pq", jac, lam, jac) / x.shape[0]


@pytest.mark.parametrize("curvature", ["hessian", "ggn"])
def test_sgd_tpv_trace_matches_dense_tr_heff_c(setup, curvature):
    model, x, y, hess, jac = setup
    noise = SGDNoise(lr=0.1, batch_size=8, curvature=curvature)
    m = hess if curvature == "hessian" else _dense_ggn(model, x, jac)
    h_eff = torch.einsum("nkp,nkq->pq", jac, jac) / x.shape[0]
    exact = noise.scale * float(torch.trace(h_eff @ m))
    est = valfree.tpv(model, x, noise, probes=64, seed=2, targets=y if curvature == "hessian" else None)
    assert abs(est.value - exact) < 4 * est.stderr, (est, exact)
    library = valfree.tpv(model, x, noise, "exact", targets=y)
    assert library.value == pytest.approx(exact, rel=1e-8)


def test_sgd_ggn_monte_carlo_matches_first_order_for_a_small_learning_rate(setup):
    model, x, *_ = setup
    noise = SGDNoise(lr=1e-4, batch_size=8)
    trace = valfree.tpv(model, x, noise, probes=32, seed=3)
    mc = valfree.tpv(model, x, noise, "monte_carlo", probes=32, seed=4)
    assert abs(trace.value - mc.value) < 3 * (trace.stderr**2 + mc.stderr**2) ** 0.5


def test_hessian_form_needs_labels_and_cannot_be_sampled(setup):
    model, x, y, *_ = setup
    with pytest.raises(ValfreeError, match="needs the training labels"):
        valfree.tpv(model, x, "sgd:lr=0.1,batch=8,curvature=hessian")
    with pytest.raises(ValfreeError, match="positive semi-definite"):
        valfree.tpv(model, x, SGDNoise(0.1, 8, "hessian"), "monte_carlo", targets=y)
