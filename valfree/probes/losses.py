"""Losses on a head's output that have no one-line closed-form residual in ``residual``.

CenterNet's penalty-reduced focal loss (Zhou et al., "Objects as Points", 2019) scores a heatmap of
per-class object centres: targets are Gaussian bumps that equal exactly 1 at a centre. With p the
sigmoid of the logit, alpha = 2 and beta = 4,

    L = -(1 / max(P, 1)) * [ sum_{Y=1} (1 - p)^alpha log p + sum_{Y<1} (1 - Y)^beta p^alpha log(1 - p) ]

where P counts the centres. The probe takes its residual dL/dA from autograd on the logits alone,
which is exact and costs one elementwise pass over the (N, C) heatmap.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def centernet_focal_loss(logits: torch.Tensor, heatmap: torch.Tensor, alpha: float = 2.0, beta: float = 4.0) -> torch.Tensor:
    """CenterNet's focal loss, summed over entries and divided by the number of centres (Y == 1).

    ``log p`` and ``log(1 - p)`` come from ``logsigmoid`` rather than CenterNet's clamped sigmoid, so
    the loss stays finite for saturated logits without changing its value elsewhere.
    """
    y = heatmap.to(logits.dtype)
    log_p = F.logsigmoid(logits)
    log_1mp = F.logsigmoid(-logits)
    p = log_p.exp()
    pos = y == 1
    pos_term = ((1 - p).pow(alpha) * log_p)[pos].sum()
    neg_term = ((1 - y).pow(beta) * p.pow(alpha) * log_1mp)[~pos].sum()
    return -(pos_term + neg_term) / pos.sum().clamp_min(1)
