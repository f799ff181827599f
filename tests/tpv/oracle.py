"""Independent references for the TPV tests: dense per-sample Jacobians and Hessians by plain autograd.

Nothing here uses valfree's own machinery (no hooks, no torch.func), so agreement is evidence.
"""

from __future__ import annotations

import torch
from torch import nn


def named_trainable(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(k, p) for k, p in model.named_parameters() if p.requires_grad]


def dense_jacobians(model: nn.Module, x: torch.Tensor, output_fn=lambda t: t) -> dict[str, torch.Tensor]:
    """{name: (N, K, *shape)}: one backward pass per (sample, output) in eval mode."""
    model.eval()
    params = named_trainable(model)
    rows: dict[str, list] = {k: [] for k, _ in params}
    for n in range(x.shape[0]):
        f = output_fn(model(x[n : n + 1])).reshape(-1)
        per_output = {k: [] for k, _ in params}
        for k_out in range(f.shape[0]):
            grads = torch.autograd.grad(f[k_out], [p for _, p in params], retain_graph=True, allow_unused=True)
            for (name, p), g in zip(params, grads):
                per_output[name].append(torch.zeros_like(p) if g is None else g)
        for name in rows:
            rows[name].append(torch.stack(per_output[name]))
    return {k: torch.stack(v) for k, v in rows.items()}


def flat(jac: dict[str, torch.Tensor]) -> torch.Tensor:
    """(N, K, P) in the order of the dict."""
    parts = list(jac.values())
    n, k = parts[0].shape[:2]
    return torch.cat([j.reshape(n, k, -1) for j in parts], dim=2)


def row_squares_from_jacobian(jac: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Row squares of g_n = J_n^T u_n for one parameter: (N, rows)."""
    g = torch.einsum("nk,nk...->n...", u, jac)
    n = g.shape[0]
    g = g.reshape(n, g.shape[1], -1) if g.dim() >= 2 else g.reshape(n, 1, 1)
    return g.square().sum(-1)


def exact_diagonal_tpv(jac: dict[str, torch.Tensor], variances: dict[str, torch.Tensor]) -> float:
    """(1/N) sum_n sum_p c_p sum_k J_nkp^2 with c constant per row (dim-0 slice)."""
    total = 0.0
    for name, c in variances.items():
        j = jac[name]
        n, k = j.shape[:2]
        sq = j.square().reshape(n, k, j.shape[2] if j.dim() > 2 else 1, -1).sum((1, 3))  # (N, rows)
        total += float((sq * c).sum()) / n
    return total


def dense_hessian(model: nn.Module, loss_fn) -> torch.Tensor:
    """The P x P Hessian of loss_fn() in all trainable parameters, row by row with double backward."""
    params = [p for _, p in named_trainable(model)]
    value = loss_fn()
    grads = torch.autograd.grad(value, params, create_graph=True)
    g = torch.cat([t.reshape(-1) for t in grads])
    rows = []
    for i in range(g.numel()):
        h = torch.autograd.grad(g[i], params, retain_graph=True, allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(p) if t is None else t).reshape(-1) for t, p in zip(h, params)]))
    return torch.stack(rows)
