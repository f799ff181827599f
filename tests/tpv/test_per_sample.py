"""Per-sample row squares: every engine against dense per-sample Jacobians (float64)."""

import pytest
import torch

from valfree.tpv import per_sample
from valfree.tpv.per_sample import _plan, row_squares

from . import oracle, zoo


def _reference(model, x, u):
    jac = oracle.dense_jacobians(model, x)
    return {k: oracle.row_squares_from_jacobian(j, u) for k, j in jac.items()}


@pytest.mark.parametrize("name", sorted(zoo.ZOO))
@pytest.mark.parametrize("engine", ["hooks", "vmap"])
def test_engines_match_dense_jacobians(name, engine):
    model = zoo.ZOO[name]().eval()
    x = zoo.inputs_for(name, 6)
    k = model(x[:1]).shape[1]
    u = torch.randint(0, 2, (6, k), generator=torch.Generator().manual_seed(3)).double() * 2 - 1
    ref = _reference(model, x, u)
    got = row_squares(model, x, u, lambda t: t, list(ref), engine=engine)
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-12, msg=f"{name}:{key}")


def test_loop_engine_matches_hooks_with_probabilities():
    model = zoo.small_cnn().eval()
    x = zoo.inputs_for("small_cnn", 5)
    u = torch.randn(5, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    softmax = lambda t: torch.softmax(t, -1)  # noqa: E731
    names = [k for k, _ in model.named_parameters()]
    a = row_squares(model, x, u, softmax, names, engine="hooks")
    b = row_squares(model, x, u, softmax, names, engine="loop")
    ref = {k: oracle.row_squares_from_jacobian(j, u) for k, j in oracle.dense_jacobians(model, x, softmax).items()}
    for key in names:
        torch.testing.assert_close(a[key], ref[key], rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(b[key], ref[key], rtol=1e-10, atol=1e-14)


def test_rules_cover_the_layers_they_should_and_leave_the_rest_to_the_fallback():
    assert set(_plan(zoo.token_net()).modules) == {"embed", "norm", "wide", "narrow", "head"}  # 'pos' has no rule
    assert set(_plan(zoo.tied()).modules) == {"head"}  # a and b share a weight


@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("name", ["conv_zoo", "token_net"])
def test_gram_and_materialised_forms_agree(monkeypatch, name, gram):
    monkeypatch.setattr(per_sample, "gram_is_cheaper", lambda *shape: gram)
    model = zoo.ZOO[name]().eval()
    x = zoo.inputs_for(name, 4)
    u = torch.randn(4, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ref = _reference(model, x, u)
    got = row_squares(model, x, u, lambda t: t, list(ref), engine="hooks")
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=1e-12)


def test_backpack_engine_agrees_where_backpack_supports_the_model():
    model = zoo.small_cnn().eval()
    x = zoo.inputs_for("small_cnn", 6)
    u = torch.randint(0, 2, (6, 4), generator=torch.Generator().manual_seed(1)).double() * 2 - 1
    names = [k for k, _ in model.named_parameters()]
    ref = row_squares(model, x, u, lambda t: t, names, engine="hooks")
    got = row_squares(model, x, u, lambda t: t, names, engine="backpack")
    for key in names:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name", ["small_cnn", "small_mlp"])
def test_hooks_engine_leaves_no_graph_alive(name):
    """The capture/tensor-hook cycle once kept every call's graph alive (215 MB per call on the demo
    CNN, which ran the evidence benchmark out of memory). After a call, no tensor with a graph may remain."""
    import gc

    model = zoo.ZOO[name]().eval()
    x = zoo.inputs_for(name, 6)
    k = model(x[:1]).shape[1]
    u = torch.ones(6, k, dtype=x.dtype)
    names = [n for n, p in model.named_parameters()]

    def graph_tensors() -> int:
        gc.collect()
        return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.grad_fn is not None)

    row_squares(model, x, u, lambda t: t, names, engine="hooks")
    before = graph_tensors()
    for _ in range(3):
        row_squares(model, x, u, lambda t: t, names, engine="hooks")
    assert graph_tensors() == before
