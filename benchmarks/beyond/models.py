"""The small models of the beyond-classification benchmarks (each trains in minutes on one CPU core).

Every one ends in a per-location linear head, which is what the probe needs: a 1x1 convolution named
``classifier`` (segmentation), ``heatmap`` and ``box`` (detection) or ``head`` (the denoiser).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, padding=dilation, dilation=dilation, bias=False),
        nn.BatchNorm2d(c_out), nn.ReLU(),
    )


class SegmentationFCN(nn.Module):
    """Dilated 3x3 convolutions at full resolution, then a 1x1 ``classifier`` over every pixel."""

    def __init__(self, num_classes: int = 11, width: int = 24):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, width), conv_bn(width, width, dilation=2), conv_bn(width, width, dilation=4),
            conv_bn(width, width, dilation=2),
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def segmentation_fcn() -> nn.Module:
    return SegmentationFCN()


class CenterNet(nn.Module):
    """A stride-2 backbone and two 1x1 heads: per-class centre ``heatmap`` logits and box ``(w, h)``
    in output cells. Returns the concatenation (B, classes + 2, H/2, W/2)."""

    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            conv_bn(1, width // 2), conv_bn(width // 2, width, stride=2), conv_bn(width, width, dilation=2),
            conv_bn(width, width, dilation=2),
        )
        self.heatmap = nn.Conv2d(width, num_classes, 1)
        self.box = nn.Conv2d(width, 2, 1)
        nn.init.constant_(self.heatmap.bias, -math.log((1 - 0.1) / 0.1))  # CenterNet's prior p = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.features(x)
        return torch.cat([self.heatmap(f), self.box(f)], 1)


def centernet() -> nn.Module:
    return CenterNet()


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], 1)


class TimeBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, t_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm1 = nn.GroupNorm(8, c_out)
        self.time = nn.Linear(t_dim, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.norm2 = nn.GroupNorm(8, c_out)
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = nn.functional.silu(self.norm1(self.conv1(x)) + self.time(temb)[:, :, None, None])
        h = nn.functional.silu(self.norm2(self.conv2(h)))
        return h + self.skip(x)


class TinyUNet(nn.Module):
    """A two-level UNet denoiser for 14x14 images, ``model(x_t, t)`` -> epsilon. Its last layer is the
    1x1 convolution ``head``; ``alphas_cumprod`` (a non-persistent buffer) is its noise schedule, which
    the ``diffusion-eps`` preset reads."""

    def __init__(self, width: int = 32, num_steps: int = 200, beta_end: float = 0.1):
        super().__init__()
        t_dim = 4 * width
        self.width = width
        self.time_mlp = nn.Sequential(nn.Linear(width, t_dim), nn.SiLU(), nn.Linear(t_dim, t_dim))
        self.stem = nn.Conv2d(1, width, 3, padding=1)
        self.down1 = TimeBlock(width, width, t_dim)
        self.pool = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.mid = TimeBlock(2 * width, 2 * width, t_dim)
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.up1 = TimeBlock(3 * width, width, t_dim)
        self.out_norm = nn.GroupNorm(8, width)
        self.head = nn.Conv2d(width, 1, 1)
        betas = torch.linspace(1e-4, beta_end, num_steps, dtype=torch.float64)
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0), persistent=False)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        temb = self.time_mlp(timestep_embedding(t, self.width))
        h1 = self.down1(self.stem(x), temb)
        h2 = self.mid(self.pool(h1), temb)
        u = self.up(h2)[..., : h1.shape[-2], : h1.shape[-1]]
        h = self.up1(torch.cat([u, h1], 1), temb)
        return self.head(nn.functional.silu(self.out_norm(h)))


def tiny_unet() -> nn.Module:
    return TinyUNet()


class FeatureClassifier(nn.Module):
    """The Fashion-MNIST classifier (14x14, inputs in [-1, 1]) whose 64-d penultimate features the
    benchmark's FID uses in place of Inception features."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(1, 32), conv_bn(32, 64, stride=2), conv_bn(64, 64, stride=2),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))
