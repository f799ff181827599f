"""A run whose predictions are scripted, so that the selection rule's answer is known in advance.

Sample i of N is the one-hot input e_i, and the model is one linear layer, so column i of the weight
is sample i's logits: setting the weight sets every prediction. 40 % of the given labels are wrong.

- checks 1-8, learning: each sample settles on its true class at a random check, and predicts a
  random class before that, so prediction changes (PC) fall;
- checks 9-12, stable: PC is 0, every sample predicts its true class (agreement 0.6);
- checks 13-30, memorisation: each wrongly labelled sample flips between its true and its given
  class until, at a random check, it settles on the given label. PC rises and label agreement climbs
  towards 1, and the probe (the head gradient on the given labels) keeps falling, so the probe alone
  would choose a late checkpoint. The Label Wave point is in the stable stretch.
"""

from __future__ import annotations

import torch
from torch import nn

N, C, CHECKS = 200, 4, 30
LEARNED_BY, STABLE_UNTIL = 8, 12
SCALE = 6.0


def make_run(seed: int = 0):
    """(inputs, given labels, a list of CHECKS + 1 weight matrices: index k is the weight at check k)."""
    g = torch.Generator().manual_seed(seed)
    true = torch.randint(0, C, (N,), generator=g)
    noisy = torch.rand(N, generator=g) < 0.4
    given = torch.where(noisy, (true + torch.randint(1, C, (N,), generator=g)) % C, true)
    learned_at = torch.randint(1, LEARNED_BY + 1, (N,), generator=g)
    memorised_at = torch.randint(STABLE_UNTIL + 1, CHECKS + 1, (N,), generator=g)
    weights = []
    for k in range(CHECKS + 1):
        pred = torch.where(k >= learned_at, true, torch.randint(0, C, (N,), generator=g))
        if k > STABLE_UNTIL:
            flipping = noisy & (k < memorised_at) & (torch.rand(N, generator=g) < 0.5)
            done = noisy & (k >= memorised_at)
            pred = torch.where(flipping | done, given, pred)
        w = torch.zeros(C, N)
        w[pred, torch.arange(N)] = SCALE
        weights.append(w)
    return torch.eye(N), given, weights


class OneHotClassifier(nn.Module):
    """logits = W x; accepts ``x`` as a keyword and returns a loss with ``labels`` (as HF models do)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(N, C, bias=False)

    def set_check(self, weights, k: int) -> None:
        with torch.no_grad():
            self.fc.weight.copy_(weights[k])

    def forward(self, x, labels=None):
        logits = self.fc(x)
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}
