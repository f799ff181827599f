"""Label-free readouts of a batch of logits: entropy, confidence, margin.

All are means over samples. For softmax heads: entropy is -sum_c p_c log p_c (nats), confidence is
max_c p_c, margin is the gap between the two largest probabilities. For multi-label (sigmoid) heads
each logit is its own binary problem and the means run over samples and labels.
"""

from __future__ import annotations

import torch


READOUTS = ("entropy", "confidence", "margin")


def softmax_readout_tensor(logits: torch.Tensor, logp: torch.Tensor | None = None) -> torch.Tensor:
    """(mean entropy, mean confidence, mean top-2 margin) of softmax ``logits`` (N, C), as one tensor.

    One tensor, not three floats, so that a caller reading several statistics pays for a single
    device-to-host copy (the piggyback probe runs every training step). ``logp``: the log-softmax
    of ``logits``, when the caller has it already.
    """
    logp = torch.log_softmax(logits, dim=1) if logp is None else logp
    p = logp.exp()
    entropy = -(p * logp).sum(1).mean()
    if logits.shape[1] < 2:
        return torch.stack([entropy, torch.ones_like(entropy), torch.ones_like(entropy)])
    top2 = p.topk(2, dim=1).values
    return torch.stack([entropy, top2[:, 0].mean(), (top2[:, 0] - top2[:, 1]).mean()])


def sigmoid_readout_tensor(logits: torch.Tensor) -> torch.Tensor:
    """(mean binary entropy, mean confidence max(p, 1-p), mean margin |2p - 1|) over samples and labels."""
    logp = torch.nn.functional.logsigmoid(logits)
    log1mp = torch.nn.functional.logsigmoid(-logits)
    p = logp.exp()
    entropy = -(p * logp + (1 - p) * log1mp)
    return torch.stack([entropy.mean(), torch.maximum(p, 1 - p).mean(), (2 * p - 1).abs().mean()])


def softmax_readouts(logits: torch.Tensor) -> dict[str, float]:
    """Mean entropy, confidence and top-2 probability margin of ``logits`` of shape (N, C)."""
    return dict(zip(READOUTS, softmax_readout_tensor(logits).tolist()))


def sigmoid_readouts(logits: torch.Tensor) -> dict[str, float]:
    """Mean binary entropy, confidence max(p, 1-p) and margin |2p - 1| over samples and labels."""
    return dict(zip(READOUTS, sigmoid_readout_tensor(logits).tolist()))
