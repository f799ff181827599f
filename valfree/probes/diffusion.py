"""The head-gradient probe for diffusion denoisers (DDPM), reproducible through a fixed seed.

The denoiser's last layer is the head and must be a per-location linear map (a 1x1 convolution, or a
Linear) whose output *is* the prediction, with the image's shape. For a batch of clean images x0 and
a noise schedule alpha_bar_t (``alphas_cumprod``), a seeded generator draws one timestep t per image,
uniform over [0, T), and Gaussian noise eps; then

    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,
    target = eps                                               (prediction="epsilon")
    target = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0  (prediction="v", Salimans & Ho 2022)

and the model is called once as ``model(x_t, t)``. The loss is the mean squared error of the head's
output against the target over every pixel and channel, which is the DDPM training loss; every pixel
counts as a sample of the head (N = B x H x W). The same seed gives the same timesteps and noise on
every checkpoint, so a trajectory of probes differs only through the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import ValfreeError
from .forward import capture_forward
from .head_gradient import HeadGradient, head_gradient_from_features
from .heads import find_head

PREDICTIONS = ("epsilon", "v")


def ddpm_alphas_cumprod(num_steps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> torch.Tensor:
    """alpha_bar_t for DDPM's linear beta schedule (Ho et al., 2020), in float64."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, 0)


def noised_batch(
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    prediction: str = "epsilon",
    seed: int = 0,
    timesteps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target) for clean images ``x0`` (B, ...), drawn with a CPU generator seeded by ``seed``.

    ``timesteps`` (B,) overrides the drawn timesteps; the noise is still drawn from the seed.
    """
    if prediction not in PREDICTIONS:
        raise ValfreeError(f"prediction must be 'epsilon' or 'v', not {prediction!r}.")
    if not x0.is_floating_point():
        raise ValfreeError(f"diffusion probe images must be floating point, got {x0.dtype}.")
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
    if ab.numel() == 0 or not ((ab > 0) & (ab <= 1)).all():
        raise ValfreeError("alphas_cumprod must be a non-empty 1-D schedule of values in (0, 1].")
    g = torch.Generator().manual_seed(seed)
    b = x0.shape[0]
    t = torch.randint(0, ab.numel(), (b,), generator=g) if timesteps is None else torch.as_tensor(timesteps).long().cpu()
    if t.shape != (b,) or (t < 0).any() or (t >= ab.numel()).any():
        raise ValfreeError(f"timesteps must be {b} integers in [0, {ab.numel() - 1}], one per image.")
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    shape = (b,) + (1,) * (x0.dim() - 1)
    a = ab[t].reshape(shape)
    x0_64 = x0.detach().cpu().double()
    x_t = a.sqrt() * x0_64 + (1 - a).sqrt() * noise
    target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0_64
    return x_t.to(x0.dtype).to(x0.device), t.to(x0.device), target.to(x0.dtype).to(x0.device)


def diffusion_head_gradient(
    model: nn.Module,
    x0: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    head: str | nn.Module | None = None,
    prediction: str = "epsilon",
    seed: int = 0,
    timesteps: torch.Tensor | None = None,
    path: str = "auto",
) -> HeadGradient:
    """Probe a denoiser on clean images ``x0`` at seeded timesteps and noise (module docstring).

    Returns a :class:`HeadGradient` with ``loss`` the denoising MSE on the probe batch; its entropy,
    confidence and margin are NaN, since a regression output has no class probabilities.
    """
    found = find_head(model, head)
    x_t, t, target = noised_batch(x0, alphas_cumprod, prediction, seed, timesteps)
    (cap,) = capture_forward(model, (x_t, t), [found])
    if tuple(cap.logits.shape) != tuple(target.shape):
        raise ValfreeError(
            f"the head {found.name!r} outputs shape {tuple(cap.logits.shape)} but the images are "
            f"{tuple(target.shape)}; the diffusion probe needs the denoiser's last layer to output the "
            f"{prediction} prediction itself (pass head='name')."
        )
    return head_gradient_from_features(cap.features, cap.logits, target, found.weight, found.bias, loss="mse", path=path)
