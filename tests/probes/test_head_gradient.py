"""The closed-form probe against autograd on an nn.Linear head (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import valfree
from tests.probes.references import autograd_reference
from valfree.probes import head_gradient_from_features, weight_grad_norm_sq



shapes = st.tuples(st.integers(1, 40), st.integers(1, 30), st.integers(2, 12))


@settings(max_examples=40, deadline=None)
@given(shape=shapes, bias=st.booleans(), smoothing=st.sampled_from([0.0, 0.1, 0.3]), seed=st.integers(0, 10**6))
def test_ce_hard_labels_match_autograd(shape, bias, smoothing, seed):
    n, d, c = shape
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    head = nn.Linear(d, c, bias=bias)
    y = torch.randint(0, c, (n,), generator=g)
    ref = autograd_reference(z, head, lambda a: F.cross_entropy(a, y, label_smoothing=smoothing))
    got = head_gradient_from_features(z, head(z).detach(), y, head.weight, head.bias, label_smoothing=smoothing)
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-6, abs=1e-12)
    assert got.bias_grad_norm == pytest.approx(ref[1], rel=1e-6, abs=1e-12)
    assert got.loss == pytest.approx(ref[2], rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, smoothing=st.sampled_from([0.0, 0.2]), seed=st.integers(0, 10**6))
def test_ce_soft_targets_match_autograd(shape, smoothing, seed):
    n, d, c = shape
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    head = nn.Linear(d, c)
    y = torch.softmax(torch.randn(n, c, generator=g) * 2, 1)
    ref = autograd_reference(z, head, lambda a: F.cross_entropy(a, y, label_smoothing=smoothing))
    got = head_gradient_from_features(z, head(z).detach(), y, head.weight, head.bias, label_smoothing=smoothing)
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-6, abs=1e-12)
    assert got.bias_grad_norm == pytest.approx(ref[1], rel=1e-6, abs=1e-12)
    assert got.loss == pytest.approx(ref[2], rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6))
def test_bce_multilabel_matches_autograd(shape, seed):
    n, d, c = shape
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    head = nn.Linear(d, c)
    y = (torch.rand(n, c, generator=g) < 0.3).double()
    ref = autograd_reference(z, head, lambda a: F.binary_cross_entropy_with_logits(a, y))
    got = head_gradient_from_features(z, head(z).detach(), y, head.weight, head.bias, loss="bce")
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-6, abs=1e-12)
    assert got.bias_grad_norm == pytest.approx(ref[1], rel=1e-6, abs=1e-12)
    assert got.loss == pytest.approx(ref[2], rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10**6), smoothing=st.sampled_from([0.0, 0.1]))
def test_ignore_index_matches_autograd(shape, seed, smoothing):
    n, d, c = shape
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    head = nn.Linear(d, c)
    y = torch.randint(0, c, (n,), generator=g)
    y[torch.rand(n, generator=g) < 0.4] = -100
    y[0] = 0  # at least one sample counts
    ref = autograd_reference(z, head, lambda a: F.cross_entropy(a, y, ignore_index=-100, label_smoothing=smoothing))
    got = head_gradient_from_features(z, head(z).detach(), y, head.weight, head.bias, label_smoothing=smoothing)
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-6, abs=1e-12)
    assert got.loss == pytest.approx(ref[2], rel=1e-9)
    assert got.batch_size == int((y != -100).sum())


def test_callable_loss_uses_autograd_residual():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(17, 9, generator=g)
    head = nn.Linear(9, 4)
    y = torch.randn(17, 4, generator=g)
    mse = lambda a, t: F.mse_loss(a, t)  # noqa: E731
    ref = autograd_reference(z, head, lambda a: mse(a, y))
    got = head_gradient_from_features(z, head(z).detach(), y, head.weight, head.bias, loss=mse)
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-9)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 60), c=st.integers(1, 50), d=st.integers(1, 50), seed=st.integers(0, 10**6))
def test_gram_and_direct_paths_agree(n, c, d, seed):
    g = torch.Generator().manual_seed(seed)
    r, z = torch.randn(n, c, generator=g), torch.randn(n, d, generator=g)
    gram, _ = weight_grad_norm_sq(r, z, "gram")
    direct, _ = weight_grad_norm_sq(r, z, "direct")
    assert gram.item() == pytest.approx(direct.item(), rel=1e-9, abs=1e-12)


def test_auto_path_picks_the_cheaper_form():
    r, z = torch.randn(64, 1000), torch.randn(64, 2048)
    assert weight_grad_norm_sq(r, z)[1] == "gram"  # ImageNet-like: N(C+d) << C d
    r, z = torch.randn(4096, 10), torch.randn(4096, 64)
    assert weight_grad_norm_sq(r, z)[1] == "direct"


def test_normalisations_are_as_documented():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, 16, generator=g) * 3
    head = nn.Linear(16, 5)
    y = torch.randint(0, 5, (32,), generator=g)
    got = head_gradient_from_features(z, head(z).detach(), y, head.weight, head.bias)
    assert got.score_w == pytest.approx(got.grad_norm / head.weight.norm().item(), rel=1e-12)
    rms = z.norm(dim=1).square().mean().sqrt().item()
    assert got.score_z == pytest.approx(got.grad_norm / rms, rel=1e-12)


def test_readouts_match_direct_definitions():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(50, 6, generator=g) * 2
    z = torch.randn(50, 3, generator=g)
    w = torch.randn(6, 3, generator=g)
    got = head_gradient_from_features(z, a, "pseudo", w)
    p = torch.softmax(a, 1)
    assert got.entropy == pytest.approx(-(p * p.log()).sum(1).mean().item(), rel=1e-9)
    assert got.confidence == pytest.approx(p.max(1).values.mean().item(), rel=1e-9)
    top2 = p.sort(1, descending=True).values
    assert got.margin == pytest.approx((top2[:, 0] - top2[:, 1]).mean().item(), rel=1e-9)


class TinyNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(7, 11), nn.BatchNorm1d(11), nn.ReLU(), nn.Dropout(0.5))
        self.fc = nn.Linear(11, 3)

    def forward(self, x):
        return self.fc(self.body(x))


def test_model_probe_matches_autograd_on_detached_features_and_restores_the_model():
    torch.manual_seed(3)
    model = TinyNet()
    model.train()
    model(torch.randn(64, 7))  # move BN running stats away from their init
    x, y = torch.randn(20, 7), torch.randint(0, 3, (20,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    got = valfree.head_gradient(model, x, y)
    assert model.training, "training mode must be restored"
    assert not model.fc._forward_hooks, "the hook must be removed"
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed (BatchNorm stats must not move in the probe)"
    model.eval()
    feats = model.body(x).detach()
    ref = autograd_reference(feats, model.fc, lambda a: F.cross_entropy(a, y))
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-9)
    assert model.fc.weight.grad is not None  # from the reference, not the probe


def test_probe_does_not_touch_parameter_grads():
    model = TinyNet()
    valfree.head_gradient(model, torch.randn(8, 7), torch.randint(0, 3, (8,)))
    assert all(p.grad is None for p in model.parameters())


def test_pseudo_label_mode_uses_the_model_argmax():
    torch.manual_seed(4)
    model = TinyNet().eval()
    x = torch.randn(30, 7)
    pseudo = model(x).argmax(1)
    a = valfree.head_gradient(model, x, "pseudo")
    b = valfree.head_gradient(model, x, pseudo)
    assert a.grad_norm == pytest.approx(b.grad_norm, rel=1e-12)


def test_float32_model_gives_float32_accuracy():
    torch.manual_seed(5)
    model = TinyNet().float()
    x, y = torch.randn(512, 7, dtype=torch.float32), torch.randint(0, 3, (512,))
    got = valfree.head_gradient(model, x, y).as_dict()
    ref = valfree.head_gradient(model.double(), x.double(), y).as_dict()
    # The float32 fast path takes the log-likelihood as a difference of two sums; it must keep float32 accuracy.
    for name in ("grad_norm", "bias_grad_norm", "loss", "entropy", "confidence", "margin", "feature_rms"):
        assert got[name] == pytest.approx(ref[name], rel=1e-4), name


@pytest.mark.parametrize("spatial", [(5, 6), (4,)])
def test_dense_1x1_conv_head_counts_every_location(spatial):
    torch.manual_seed(6)
    conv = nn.Conv2d(8, 5, 1) if len(spatial) == 2 else nn.Conv1d(8, 5, 1)
    z = torch.randn(3, 8, *spatial)
    y = torch.randint(0, 5, (3, *spatial))
    y.view(-1)[::4] = -100
    ref = autograd_reference(z, conv, lambda a: F.cross_entropy(a, y, ignore_index=-100))
    got = head_gradient_from_features(z, conv(z).detach(), y, conv.weight, conv.bias)
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-9)
    assert got.bias_grad_norm == pytest.approx(ref[1], rel=1e-9)


def test_linear_over_tokens_counts_every_token():
    torch.manual_seed(7)
    head = nn.Linear(6, 9)
    z = torch.randn(2, 5, 6)
    y = torch.randint(0, 9, (2, 5))
    ref = autograd_reference(z, head, lambda a: F.cross_entropy(a.reshape(-1, 9), y.reshape(-1)))
    got = head_gradient_from_features(z, head(z).detach(), y, head.weight, head.bias)
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-9)
    assert got.batch_size == 10


def test_labels_out_of_range_are_a_clear_error():
    head = nn.Linear(4, 3)
    z = torch.randn(5, 4)
    with pytest.raises(valfree.ValfreeError, match=r"labels must lie in \[0, 2\].*holds 7"):
        head_gradient_from_features(z, head(z).detach(), torch.tensor([0, 1, 7, 2, 1]), head.weight, head.bias)


def test_nan_logits_are_a_clear_error():
    z = torch.randn(4, 3)
    a = torch.randn(4, 2)
    a[1, 0] = math.nan
    with pytest.raises(valfree.ValfreeError, match="NaN or infinite logits"):
        head_gradient_from_features(z, a, torch.tensor([0, 1, 0, 1]), torch.randn(2, 3))


@settings(max_examples=30, deadline=None)
@given(shape=shapes, bias=st.booleans(), path=st.sampled_from(["gram", "direct"]), seed=st.integers(0, 10**6))
def test_hard_label_fast_path_equals_the_general_path(shape, bias, path, seed):
    """Hard labels take a shortcut (scatter/gather, one host copy); the same labels as one-hot soft
    targets take the general path. Every field must agree."""
    n, d, c = shape
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g)
    head = nn.Linear(d, c, bias=bias)
    y = torch.randint(0, c, (n,), generator=g)
    a = head(z).detach()
    fast = head_gradient_from_features(z, a, y, head.weight, head.bias, path=path).as_dict()
    general = head_gradient_from_features(z, a, F.one_hot(y, c).double(), head.weight, head.bias, path=path).as_dict()
    assert fast.pop("path") == general.pop("path")
    # Only hard labels are checked for a one-class batch; the shortcut reads it from the class counts.
    assert bool(fast.pop("warnings")) == (y.unique().numel() == 1)
    general.pop("warnings")
    assert fast == pytest.approx(general, rel=1e-12, abs=1e-14)


def test_an_in_range_ignore_index_is_ignored_not_taken_for_a_class():
    """ignore_index=0 ("background ignored"): label 0 must drop out, as in F.cross_entropy."""
    g = torch.Generator().manual_seed(5)
    z = torch.randn(12, 6, generator=g)
    head = nn.Linear(6, 4)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3, 0, 0, 1, 2])
    ref = autograd_reference(z, head, lambda a: F.cross_entropy(a, y, ignore_index=0))
    got = head_gradient_from_features(z, head(z).detach(), y, head.weight, head.bias, ignore_index=0)
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-10)
    assert got.batch_size == 8


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_non_finite_logits_are_caught_on_the_fast_path_too(bad):
    a = torch.randn(5, 3)
    a[2, 1] = bad
    with pytest.raises(valfree.ValfreeError, match="NaN or infinite logits"):
        head_gradient_from_features(torch.randn(5, 4), a, torch.tensor([0, 1, 2, 0, 1]), torch.randn(3, 4))


def test_single_class_batch_is_flagged():
    z = torch.randn(6, 3)
    head = nn.Linear(3, 4)
    got = head_gradient_from_features(z, head(z).detach(), torch.full((6,), 2), head.weight, head.bias)
    assert got.warnings and "single class (2)" in got.warnings[0]


@pytest.mark.parametrize("labels, expected", [
    ([2] * 6, 2),           # one class
    ([2] * 5 + [0], None),  # one sample of another class is enough to drop the warning
])
def test_one_class_warning_on_the_fast_path_is_exact(labels, expected):
    """The shortcut reads the class counts from column sums; it must neither miss a one-class batch nor
    flag a batch with a single odd label, in float32 as in float64."""
    for dtype in (torch.float32, torch.float64):
        z = torch.randn(len(labels), 3, dtype=dtype)
        head = nn.Linear(3, 4).to(dtype)
        got = head_gradient_from_features(z, head(z).detach(), torch.tensor(labels), head.weight, head.bias)
        assert bool(got.warnings) == (expected is not None)
        if expected is not None:
            assert f"single class ({expected})" in got.warnings[0]
