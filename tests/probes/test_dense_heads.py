"""Dense heads (1x1 convolutions, Linear over pixels) with the dense-prediction losses, and several
heads at once, against autograd through the heads alone on detached features (float64)."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import valfree
from tests.probes.references import autograd_reference
from valfree.probes import centernet_focal_loss, head_gradient_from_features, head_gradients, residual



def reference_focal(a, y, alpha=2.0, beta=4.0):
    """CenterNet's loss written from the paper's formula, independently of valfree's implementation."""
    p = torch.sigmoid(a)
    pos = y.eq(1)
    pos_loss = -(torch.log(p) * (1 - p) ** alpha)[pos].sum()
    neg_loss = -(torch.log(1 - p) * p**alpha * (1 - y) ** beta)[~pos].sum()
    return (pos_loss + neg_loss) / max(int(pos.sum()), 1)


def heatmap(shape, g):
    """Gaussian-like values in [0, 1) with a few exact 1s at 'centres'."""
    y = torch.rand(shape, generator=g) ** 3 * 0.95
    flat = y.view(-1)
    flat[torch.randperm(flat.numel(), generator=g)[: max(1, flat.numel() // 20)]] = 1.0
    return y


dense = st.tuples(st.integers(1, 3), st.integers(1, 6), st.integers(1, 6), st.integers(1, 9), st.integers(1, 5))


@settings(max_examples=15, deadline=None)
@given(shape=dense, loss=st.sampled_from(["mse", "l1"]), holes=st.booleans(), seed=st.integers(0, 10**6))
def test_regression_losses_on_a_1x1_conv_match_autograd(shape, loss, holes, seed):
    b, h, w, d, c = shape
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(d, c, 1)
    z = torch.randn(b, d, h, w, generator=g)
    y = torch.randn(b, c, h, w, generator=g)
    if holes:  # NaN marks locations without a target (no object there), as CenterNet's box head
        y[torch.rand(b, 1, h, w, generator=g).expand_as(y) < 0.5] = math.nan
        y[0, :, 0, 0] = 1.0
    valid = ~torch.isnan(y)
    fn = F.mse_loss if loss == "mse" else F.l1_loss
    ref = autograd_reference(z, conv, lambda a: fn(a[valid], y[valid]))
    got = head_gradient_from_features(z, conv(z).detach(), y, conv.weight, conv.bias, loss=loss)
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-6, abs=1e-12)
    assert got.bias_grad_norm == pytest.approx(ref[1], rel=1e-6, abs=1e-12)
    assert got.loss == pytest.approx(ref[2], rel=1e-9)
    assert got.batch_size == int(valid.any(1).sum())  # locations with a target are the samples
    assert math.isnan(got.entropy)  # no class probabilities for a regression output


@settings(max_examples=15, deadline=None)
@given(shape=dense, seed=st.integers(0, 10**6))
def test_centernet_focal_heatmap_matches_autograd(shape, seed):
    b, h, w, d, c = shape
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(d, c, 1)
    z = torch.randn(b, d, h, w, generator=g) * 2
    y = heatmap((b, c, h, w), g)
    ref = autograd_reference(z, conv, lambda a: reference_focal(a, y))
    got = head_gradient_from_features(z, conv(z).detach(), y, conv.weight, conv.bias, loss="focal")
    assert got.grad_norm == pytest.approx(ref[0], rel=1e-6, abs=1e-12)
    assert got.bias_grad_norm == pytest.approx(ref[1], rel=1e-6, abs=1e-12)
    assert got.loss == pytest.approx(ref[2], rel=1e-9)


def test_focal_loss_equals_the_formula_and_stays_finite_when_saturated():
    g = torch.Generator().manual_seed(0)
    a, y = torch.randn(40, 3, generator=g), heatmap((40, 3), g)
    assert centernet_focal_loss(a, y).item() == pytest.approx(reference_focal(a, y).item(), rel=1e-12)
    r, value = residual(torch.tensor([[60.0, -60.0]]), torch.tensor([[0.0, 1.0]]), "focal")
    assert torch.isfinite(r).all() and math.isfinite(value.item())


@settings(max_examples=12, deadline=None)
@given(shape=dense, seed=st.integers(0, 10**6), loss=st.sampled_from(["ce", "mse", "focal"]))
def test_linear_over_pixels_equals_the_same_1x1_conv(shape, seed, loss):
    """A Linear applied channels-last over pixels is the 1x1 convolution with the same weight."""
    b, h, w, d, c = shape
    g = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(d, c, 1)
    lin = nn.Linear(d, c)
    lin.weight.data = conv.weight.data.view(c, d).clone()
    lin.bias.data = conv.bias.data.clone()
    z = torch.randn(b, d, h, w, generator=g)
    if loss == "ce":
        y = torch.randint(0, c, (b, h, w), generator=g)
        y_last = y
    else:
        y = heatmap((b, c, h, w), g) if loss == "focal" else torch.randn(b, c, h, w, generator=g)
        y_last = y.movedim(1, -1)
    z_last = z.movedim(1, -1)
    a = head_gradient_from_features(z, conv(z).detach(), y, conv.weight, conv.bias, loss=loss)
    bb = head_gradient_from_features(z_last, lin(z_last).detach(), y_last, lin.weight, lin.bias, loss=loss)
    assert a.grad_norm == pytest.approx(bb.grad_norm, rel=1e-9, abs=1e-14)
    assert a.batch_size == bb.batch_size == b * h * w


def test_large_dense_batch_takes_the_direct_path_and_both_paths_agree():
    g = torch.Generator().manual_seed(1)
    conv = nn.Conv2d(16, 11, 1)
    z = torch.randn(4, 16, 20, 20, generator=g)
    y = torch.randint(0, 11, (4, 20, 20), generator=g)
    auto = head_gradient_from_features(z, conv(z).detach(), y, conv.weight, conv.bias)
    gram = head_gradient_from_features(z, conv(z).detach(), y, conv.weight, conv.bias, path="gram")
    assert auto.path == "direct"  # N = 1600 locations: N (C + d) >> C d
    assert auto.grad_norm == pytest.approx(gram.grad_norm, rel=1e-9)


class TwoHeadDetector(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, 6, 3, padding=1), nn.ReLU())
        self.heatmap = nn.Conv2d(6, 3, 1)
        self.box = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        f = self.body(x)
        return torch.cat([self.heatmap(f), self.box(f)], 1)


def test_two_heads_each_and_combined_match_autograd_of_the_weighted_total_loss():
    torch.manual_seed(2)
    g = torch.Generator().manual_seed(2)
    model = TwoHeadDetector()
    x = torch.randn(3, 2, 5, 5, generator=g)
    hm = heatmap((3, 3, 5, 5), g)
    box = torch.full((3, 2, 5, 5), math.nan)
    box[:, :, 2, 2] = torch.rand(3, 2, generator=g) * 4
    got = head_gradients(model, x, {"heatmap": hm, "box": box}, {"heatmap": "focal", "box": "l1"}, {"box": 0.1})
    assert all(p.grad is None for p in model.parameters()), "the probe must not touch .grad"
    feats = model.body(x).detach()
    has = ~torch.isnan(box)
    model.zero_grad()
    total = reference_focal(model.heatmap(feats), hm) + 0.1 * F.l1_loss(model.box(feats)[has], box[has])
    total.backward()
    g_hm, g_box = model.heatmap.weight.grad.norm().item(), model.box.weight.grad.norm().item()
    assert got.heads["heatmap"].grad_norm == pytest.approx(g_hm, rel=1e-6)
    assert got.heads["box"].grad_norm == pytest.approx(g_box / 0.1, rel=1e-6)  # per-head results are unweighted
    joint = math.sqrt(g_hm**2 + g_box**2)  # the norm of the gradient w.r.t. both weights together
    assert got.grad_norm == pytest.approx(joint, rel=1e-6)
    assert got.loss == pytest.approx(total.item(), rel=1e-9)
    w = math.sqrt(model.heatmap.weight.norm().item() ** 2 + model.box.weight.norm().item() ** 2)
    assert got.score_w == pytest.approx(joint / w, rel=1e-9)
    row = got.as_dict()
    assert row["heatmap.grad_norm"] == got.heads["heatmap"].grad_norm and "box.loss" in row


def test_multi_head_errors_are_clear():
    model = TwoHeadDetector()
    x = torch.randn(1, 2, 4, 4)
    with pytest.raises(valfree.ValfreeError, match="no targets for head.*'box'"):
        head_gradients(model, x, {"heatmap": torch.zeros(1, 3, 4, 4)}, {"heatmap": "focal", "box": "l1"})
    with pytest.raises(valfree.ValfreeError, match="loss_weights names head.*'boxes'"):
        head_gradients(model, x, {"box": torch.zeros(1, 2, 4, 4)}, {"box": "l1"}, {"boxes": 0.1})


class ThreeByThreeHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(1, 4, 1)
        self.out = nn.Conv2d(4, 3, 3, padding=1)

    def forward(self, x):
        return self.out(self.body(x))


def test_a_3x3_conv_head_is_rejected_with_the_module_named():
    model = ThreeByThreeHead()
    x = torch.randn(1, 1, 4, 4)
    for head in ("out", model.out):
        with pytest.raises(valfree.ValfreeError, match=r"module 'out' is a Conv2d with kernel_size \(3, 3\).*"
                           r"not a per-location linear map; supported heads are.*1x1 convolution"):
            valfree.head_gradient(model, x, torch.zeros(1, 4, 4, dtype=torch.long), head=head)


def test_a_head_called_twice_is_rejected():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Conv2d(3, 2, 1)

        def forward(self, x):  # one head over two feature levels, as FPN detectors do
            return self.head(x), self.head(x[..., ::2, ::2])

    with pytest.raises(valfree.ValfreeError, match="called 2 times"):
        valfree.head_gradient(Shared(), torch.randn(1, 3, 4, 4), torch.zeros(1, 2, 2, dtype=torch.long))


def test_regression_targets_of_the_wrong_shape_and_pseudo_targets_are_clear_errors():
    conv = nn.Conv2d(3, 2, 1)
    z = torch.randn(1, 3, 4, 4)
    with pytest.raises(valfree.ValfreeError, match="mse targets must have the head output's shape"):
        head_gradient_from_features(z, conv(z).detach(), torch.randn(1, 2, 4, 4)[:, :1], conv.weight, loss="mse")
    with pytest.raises(valfree.ValfreeError, match="pseudo targets are defined for classification losses"):
        head_gradient_from_features(z, conv(z).detach(), "pseudo", conv.weight, loss="l1")
    with pytest.raises(valfree.ValfreeError, match="every l1 target in the probe batch is NaN"):
        head_gradient_from_features(z, conv(z).detach(), torch.full((1, 2, 4, 4), math.nan), conv.weight, loss="l1")
    with pytest.raises(valfree.ValfreeError, match="unknown loss 'huber'; use one of ce, bce, focal, mse, l1"):
        head_gradient_from_features(z, conv(z).detach(), torch.randn(1, 2, 4, 4), conv.weight, loss="huber")
