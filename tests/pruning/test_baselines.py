"""The criteria valfree adds or repairs next to Torch-Pruning's, against direct computations."""


import pytest
import torch
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn

from valfree.pruning import HessianImportance, TaylorImportance, WHCImportance, calibration_from
from valfree.pruning.criteria import CRITERIA, LABEL_FREE, get_criterion, make_importance
from valfree import ValfreeError


def small_net(seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 5, 3, stride=2), nn.Flatten(), nn.Linear(5 * 9, 3))
    with torch.no_grad():
        net[1].weight.uniform_(0.5, 1.5)
        net[1].bias.uniform_(-0.5, 0.5)
    return net.eval()


def data(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def test_hessian_averages_squared_per_sample_gradients():
    """Torch-Pruning's accumulator kept only the last sample; ours must hold E_n[g_n^2] for every parameter."""
    net = small_net()
    x, y = data()
    imp = HessianImportance()
    imp.update(net, calibration_from((x, y), batch_size=8, labels=True))
    reference = {name: torch.zeros_like(p) for name, p in net.named_parameters()}
    for n in range(len(x)):  # one backward per sample: the slow, obvious way
        net.zero_grad()
        F.cross_entropy(net(x[n:n + 1]), y[n:n + 1]).backward()
        for name, p in net.named_parameters():
            reference[name] += p.grad ** 2 / len(x)
    graph = tp.DependencyGraph().build_dependency(net, x[:1])
    imp(graph.get_pruning_group(net[0], tp.prune_conv_out_channels, [0, 1, 2, 3]))  # moves the mean into .grad
    for name, p in net.named_parameters():
        torch.testing.assert_close(p.grad, reference[name], rtol=1e-5, atol=1e-9)


def test_hessian_accumulate_grad_keeps_every_sample():
    """The upstream call pattern (backward per sample, then accumulate_grad) now averages all samples."""
    net = small_net()
    x, y = data(3)
    imp = HessianImportance()
    squares = []
    for n in range(3):
        net.zero_grad()
        F.cross_entropy(net(x[n:n + 1]), y[n:n + 1]).backward()
        imp.accumulate_grad(net)
        squares.append(net[0].weight.grad.clone() ** 2)
    assert imp._counter[net[0].weight] == 3
    torch.testing.assert_close(imp._accu_grad[net[0].weight] / 3, sum(squares) / 3)


def test_hessian_group_score_is_w2_times_mean_g2():
    net = small_net()
    x, y = data()
    imp = HessianImportance(normalizer=None, group_reduction="first")
    imp.update(net, calibration_from((x, y), batch_size=8, labels=True))
    graph = tp.DependencyGraph().build_dependency(net, x[:1])
    score = imp(graph.get_pruning_group(net[0], tp.prune_conv_out_channels, [0, 1, 2, 3]))
    mean_g2 = net[0].weight.grad  # checked against per-sample backward above
    torch.testing.assert_close(score, (net[0].weight.detach() ** 2 * mean_g2).flatten(1).sum(1))


def test_taylor_counts_the_batchnorm_scale():
    """Group score = mean of |w g| over conv1 output, BN scale and conv2 input, then / mean."""
    net = small_net()
    x, y = data()
    calibration = calibration_from((x, y), batch_size=8, labels=True)
    imp = TaylorImportance()
    imp.update(net, calibration)
    net_ref = small_net()
    for xb, yb in zip(calibration.inputs, calibration.labels):
        F.cross_entropy(net_ref(xb), yb).backward()
    conv1, bn, conv2 = net_ref[0], net_ref[1], net_ref[3]
    terms = [(conv1.weight * conv1.weight.grad).abs().flatten(1).sum(1),
             (bn.weight * bn.weight.grad).abs(),
             (conv2.weight * conv2.weight.grad).abs().transpose(0, 1).flatten(1).sum(1)]
    expected = sum(terms) / 3
    expected = expected / expected.mean()
    graph = tp.DependencyGraph().build_dependency(net, x[:1])
    got = imp(graph.get_pruning_group(net[0], tp.prune_conv_out_channels, [0, 1, 2, 3]))
    torch.testing.assert_close(got, expected.detach(), rtol=1e-5, atol=1e-7)


def test_whc_matches_its_formula():
    g = torch.Generator().manual_seed(5)
    filters = torch.randn(6, 10, generator=g, dtype=torch.float64)
    filters[3] = 2.5 * filters[1]  # a redundant filter: cosine 1 with filter 1
    expected = []
    for i in range(6):
        total = 0.0
        for j in range(6):
            cos = float(filters[i] @ filters[j]) / (float(filters[i].norm()) * float(filters[j].norm()))
            total += float(filters[j].norm()) * (1 - abs(cos))
        expected.append(float(filters[i].norm()) * total)
    got = WHCImportance.whc_scores(filters)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_whc_scores_a_conv_group_on_its_filters():
    net = small_net()
    x, _ = data()
    graph = tp.DependencyGraph().build_dependency(net, x[:1])
    group = graph.get_pruning_group(net[0], tp.prune_conv_out_channels, [0, 1, 2, 3])
    got = WHCImportance(normalizer=None, group_reduction="first")(group)
    torch.testing.assert_close(got, WHCImportance.whc_scores(net[0].weight.detach().flatten(1)))


def test_registry_names_and_labels():
    assert set(CRITERIA) == {"jbr", "jacobian", "l1", "bn_scale", "fpgm", "whc", "random", "taylor", "hessian"}
    assert set(LABEL_FREE) == {"jbr", "l1", "bn_scale", "fpgm", "whc", "random"}
    for name in CRITERIA:
        imp = make_importance(name)
        assert callable(imp)
        assert bool(getattr(imp, "requires_labels", False)) == CRITERIA[name].uses_labels
    assert isinstance(make_importance("l1"), tp.importance.GroupMagnitudeImportance) and make_importance("l1").p == 1
    assert get_criterion("BN-Scale").name == "bn_scale"


def test_unknown_criterion_is_one_clear_sentence():
    with pytest.raises(ValfreeError, match=r"unknown pruning criterion 'jbrr'.*jbr, jacobian.*Did you mean 'jbr'\?"):
        get_criterion("jbrr")
