"""The diffusion probe: seeded noising, epsilon/v targets, and the head gradient against autograd."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import valfree
from valfree.probes import ddpm_alphas_cumprod, diffusion_head_gradient, noised_batch



class TinyDenoiser(nn.Module):
    """model(x_t, t): a time-conditioned conv body and a 1x1 ``head`` that outputs the prediction."""

    def __init__(self, channels=2, width=5, head_kernel=1):
        super().__init__()
        self.body = nn.Conv2d(channels, width, 3, padding=1)
        self.time = nn.Embedding(50, width)
        self.head = nn.Conv2d(width, channels, head_kernel, padding=head_kernel // 2)

    def features(self, x, t):
        return torch.tanh(self.body(x) + self.time(t)[:, :, None, None])

    def forward(self, x, t):
        return self.head(self.features(x, t))


def test_ddpm_schedule_is_the_cumulative_product_of_the_linear_betas():
    ab = ddpm_alphas_cumprod(10, 0.1, 0.5)
    betas = torch.linspace(0.1, 0.5, 10, dtype=torch.float64)
    assert torch.allclose(ab, torch.tensor([float((1 - betas[: i + 1]).prod()) for i in range(10)]))


def test_noising_is_reproducible_from_the_seed_and_follows_the_formulas():
    x0 = torch.randn(6, 2, 4, 4)
    ab = ddpm_alphas_cumprod(50, 1e-3, 0.2)
    x_t, t, eps = noised_batch(x0, ab, "epsilon", seed=3)
    x_t2, t2, eps2 = noised_batch(x0, ab, "epsilon", seed=3)
    assert torch.equal(x_t, x_t2) and torch.equal(t, t2) and torch.equal(eps, eps2)
    assert not torch.equal(noised_batch(x0, ab, "epsilon", seed=4)[0], x_t)
    a = ab[t].view(-1, 1, 1, 1)
    assert torch.allclose(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    _, tv, v = noised_batch(x0, ab, "v", seed=3)
    assert torch.equal(tv, t)
    assert torch.allclose(v, a.sqrt() * eps - (1 - a).sqrt() * x0)


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_probe_matches_autograd_through_the_head_alone(prediction):
    torch.manual_seed(0)
    model = TinyDenoiser()
    x0 = torch.randn(4, 2, 5, 5)
    ab = ddpm_alphas_cumprod(50, 1e-3, 0.2)
    got = diffusion_head_gradient(model, x0, ab, prediction=prediction, seed=7)
    x_t, t, target = noised_batch(x0, ab, prediction, seed=7)
    feats = model.features(x_t, t).detach()
    loss = F.mse_loss(model.head(feats), target)
    loss.backward()
    assert got.grad_norm == pytest.approx(model.head.weight.grad.norm().item(), rel=1e-9)
    assert got.bias_grad_norm == pytest.approx(model.head.bias.grad.norm().item(), rel=1e-9)
    assert got.loss == pytest.approx(loss.item(), rel=1e-12)
    assert got.batch_size == 4 * 5 * 5
    again = diffusion_head_gradient(model, x0, ab, prediction=prediction, seed=7)
    assert again.grad_norm == got.grad_norm  # same seed, same number


def test_explicit_timesteps_are_used():
    model = TinyDenoiser()
    x0 = torch.randn(3, 2, 4, 4)
    ab = ddpm_alphas_cumprod(50)
    x_t, t, _ = noised_batch(x0, ab, seed=0, timesteps=torch.tensor([0, 10, 49]))
    assert t.tolist() == [0, 10, 49]
    with pytest.raises(valfree.ValfreeError, match="timesteps must be 3 integers in \\[0, 49\\]"):
        noised_batch(x0, ab, seed=0, timesteps=torch.tensor([0, 10, 50]))


def test_a_3x3_output_conv_and_a_mismatched_head_are_clear_errors():
    x0 = torch.randn(2, 2, 4, 4)
    ab = ddpm_alphas_cumprod(50)
    with pytest.raises(valfree.ValfreeError, match=r"module 'head' is a Conv2d with kernel_size \(3, 3\)"):
        diffusion_head_gradient(TinyDenoiser(head_kernel=3), x0, ab, head="head")
    with pytest.raises(valfree.ValfreeError, match=r"outputs shape \(2, 4, 4, 4\) but the images are \(2, 2, 4, 4\)"):
        diffusion_head_gradient(LearnedVariance(), x0, ab)


class LearnedVariance(TinyDenoiser):
    """Improved-DDPM style: the last layer outputs epsilon and a variance, so it is not the prediction itself."""

    def __init__(self):
        super().__init__()
        self.head = nn.Conv2d(5, 4, 1)

    def forward(self, x, t):
        return self.head(self.features(x, t))[:, :2]
