"""Label-free readouts of a batch of logits: entropy, confidence, margin.

All are means over samples. For softmax heads: entropy is -sum_c p_c log p_c (nats), confidence is
max_c p_c, margin is the gap between the two largest probabilities. For multi-label (sigmoid) heads
each logit is its own binary problem and the means run over samples and labels.
"""

from __future__ import annotations

import torch


def softmax_readouts(logits: torch.Tensor) -> dict[str, float]:
    """Mean entropy, confidence and top-2 probability margin of ``logits`` of shape (N, C)."""
    logp = torch.log_softmax(logits, dim=1)
    p = logp.exp()
    entropy = -(p * logp).sum(1)
    if logits.shape[1] >= 2:
        top2 = p.topk(2, dim=1).values
        margin = top2[:, 0] - top2[:, 1]
    else:
        margin = torch.ones_like(entropy)
    return {
        "entropy": float(entropy.mean()),
        "confidence": float(top2[:, 0].mean()) if logits.shape[1] >= 2 else 1.0,
        "margin": float(margin.mean()),
    }


def sigmoid_readouts(logits: torch.Tensor) -> dict[str, float]:
    """Mean binary entropy, confidence max(p, 1-p) and margin |2p - 1| over samples and labels."""
    logp = torch.nn.functional.logsigmoid(logits)
    log1mp = torch.nn.functional.logsigmoid(-logits)
    p = logp.exp()
    entropy = -(p * logp + (1 - p) * log1mp)
    return {
        "entropy": float(entropy.mean()),
        "confidence": float(torch.maximum(p, 1 - p).mean()),
        "margin": float((2 * p - 1).abs().mean()),
    }
