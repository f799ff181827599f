"""Noise models: their covariances, draws, specs and checks."""

import pytest
import torch

from valfree.errors import ValfreeError
from valfree.tpv import Isotropic, LabelNoise, Pruning, Quantization, SGDNoise, parse_noise
from valfree.tpv.linearize import trainable

from . import zoo


def _params():
    return trainable(zoo.fm_mlp())


def test_quantization_step_per_tensor_channel_and_global():
    params = _params()
    w = params["1.weight"]
    tensor = Quantization(4, "tensor").variances(params)["1.weight"]
    assert torch.allclose(tensor, ((w.max() - w.min()) / 15) ** 2 / 12 * torch.ones(16, dtype=w.dtype))
    channel = Quantization(4, "channel").variances(params)["1.weight"]
    assert torch.allclose(channel, ((w.amax(1) - w.amin(1)) / 15) ** 2 / 12)
    bias = Quantization(4, "channel").variances(params)["1.bias"]  # 1-d: the tensor range
    b = params["1.bias"]
    assert torch.allclose(bias, ((b.max() - b.min()) / 15) ** 2 / 12 * torch.ones_like(b))
    everything = torch.cat([p.flatten() for p in params.values()])
    glob = Quantization(4, "global").variances(params)
    step = (everything.max() - everything.min()) / 15
    assert all(torch.allclose(v, step**2 / 12 * torch.ones_like(v)) for v in glob.values())


def test_quantization_draws_have_the_stated_variance_and_rounding_stays_within_half_a_step():
    params = _params()
    noise = Quantization(3, "channel")
    draws = torch.stack([noise.sample(params, torch.Generator().manual_seed(s))["1.weight"] for s in range(400)])
    expected = noise.variances(params)["1.weight"].unsqueeze(1).expand(16, 64)
    # 400 x 64 uniform draws per row: the variance estimate is good to about 1.5 % (kurtosis of a uniform is 1.8).
    assert torch.allclose(draws.var(0).mean(1), expected.mean(1), rtol=0.06)
    steps = noise.steps(params)["1.weight"].unsqueeze(1)
    err = noise.rounding(params)["1.weight"]
    assert (err.abs() <= steps / 2 + 1e-12).all() and err.abs().max() > 0.3 * steps.min()


def test_skip_list_keeps_modules_in_full_precision_and_head_means_the_classifier():
    model = zoo.fm_mlp()
    params = trainable(model)
    noise = Quantization(8, skip=("head",)).prepare(model, params)
    assert noise.skip == ("fc",)
    assert set(noise.variances(params)) == {"1.weight", "1.bias"}
    with pytest.raises(ValfreeError, match="no such module"):
        Quantization(8, skip=("nope",)).prepare(model, params)
    with pytest.raises(ValfreeError, match="nothing would be quantized"):
        Quantization(8, skip=("1", "fc")).prepare(model, params)


def test_isotropic_draws():
    params = _params()
    draws = torch.stack([Isotropic(0.2).sample(params, torch.Generator().manual_seed(s))["1.weight"] for s in range(200)])
    assert draws.std().item() == pytest.approx(0.2, rel=0.02)


def test_pruning_masks_by_name_channel_and_magnitude():
    model = zoo.fm_mlp()
    params = trainable(model)
    channel = Pruning({"1.weight": torch.tensor([True] + [False] * 15)}).prepare(model, params)
    assert channel.mask["1.weight"].shape == (16, 64) and channel.mask["1.weight"][0].all()
    dw = channel.direction(params)["1.weight"]
    assert torch.equal(dw[0], -params["1.weight"][0]) and not dw[1:].any()
    magnitude = Pruning(amount=0.25).prepare(model, params)
    removed = sum(int(m.sum()) for m in magnitude.mask.values())
    total = sum(p.numel() for p in params.values() if p.dim() >= 2)
    assert removed == pytest.approx(0.25 * total, abs=2)
    with pytest.raises(ValfreeError, match="shape"):
        Pruning({"1.weight": torch.ones(3, dtype=torch.bool)}).prepare(model, params)
    with pytest.raises(ValfreeError, match="not a trainable parameter"):
        Pruning({"x.weight": torch.ones(3, dtype=torch.bool)}).prepare(model, params)


@pytest.mark.parametrize("spec, expected", [
    ("iso:1e-3", Isotropic(1e-3)),
    ("quant:8", Quantization(8, "tensor")),
    ("quant:4:channel", Quantization(4, "channel")),
    ("quant:2:global", Quantization(2, "global")),
    ("sgd:lr=0.1,batch=128", SGDNoise(0.1, 128)),
    ("sgd:lr=0.05,batch=32,curvature=hessian,loss=mse", SGDNoise(0.05, 32, "hessian", "mse")),
    ("label:0.1", LabelNoise(0.1)),
])
def test_specs_parse(spec, expected):
    assert parse_noise(spec) == expected


@pytest.mark.parametrize("spec, message", [
    ("gauss:1", "unknown noise spec"),
    ("quant", "unknown noise spec"),
    ("quant:0", "bits from 1 to 32"),
    ("quant:-2", "bits from 1 to 32"),
    ("quant:eight", "must be an integer"),
    ("quant:8:row", "granularity"),
    ("iso:-1", "sigma > 0"),
    ("iso:abc", "must be a number"),
    ("sgd:lr=0.1", "needs lr= and batch="),
    ("sgd:lr=0.1,batch=0", "batch size of at least 1"),
    ("label:0", "sigma > 0"),
    ("prune:1.5", "in \\(0, 1\\)"),
])
def test_bad_specs_say_what_is_wrong(spec, message):
    with pytest.raises(ValfreeError, match=message):
        parse_noise(spec)


def test_empty_mask_is_refused():
    with pytest.raises(ValfreeError, match="mask is empty"):
        Pruning({"1.weight": torch.zeros(16, 64, dtype=torch.bool)})
    with pytest.raises(ValfreeError, match="mask is empty"):
        Pruning({})
