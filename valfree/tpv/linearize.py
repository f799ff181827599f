"""The model around w*: Jacobian-vector products, per-sample Jacobians and curvature-vector products.

Everything here treats the model as f(w, x) through ``torch.func.functional_call`` with the trainable
parameters as w (buffers held fixed), in whatever mode the caller left the model (eval, for TPV).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, jvp, vmap

from ..batches import batch_size_of, call_args, forward, logits_of, map_tensors, take
from .per_sample import OutputFn, output_rows

Params = Mapping[str, torch.Tensor]


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters by qualified name, detached (the point w* we linearise at)."""
    return {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}


def functional(model: nn.Module, output_fn: OutputFn) -> Callable[[Params, torch.Tensor], torch.Tensor]:
    """f(w, x) -> (N, K) with w a dict of (some of) the trainable parameters."""
    base = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def f(theta: Params, x) -> torch.Tensor:
        args, kwargs = call_args(model, x)
        return output_rows(functional_call(model, ({**base, **theta}, buffers), args, kwargs), output_fn)

    return f


def jacobian_vector(model: nn.Module, x: torch.Tensor, output_fn: OutputFn, direction: Params) -> torch.Tensor:
    """J(x) v for every input: (N, K), by forward-mode differentiation in the parameter direction v."""
    f = functional(model, output_fn)
    primals = {k: p.detach() for k, p in model.named_parameters() if k in direction}
    tangents = {k: direction[k].to(primals[k].dtype) for k in primals}
    _, jv = jvp(lambda theta: f(theta, x), (primals,), (tangents,))
    return jv


def vector_jacobian(model: nn.Module, x: torch.Tensor, output_fn: OutputFn, cotangent: torch.Tensor, names: list[str]) -> dict[str, torch.Tensor]:
    """sum_n J(x_n)^T c_n for a cotangent c of shape (N, K): one backward pass."""
    params = dict(model.named_parameters())
    with torch.enable_grad():
        f = output_rows(forward(model, x), output_fn)
        grads = torch.autograd.grad((f * cotangent).sum(), [params[k] for k in names], allow_unused=True)
    return {k: torch.zeros_like(params[k]) if g is None else g for k, g in zip(names, grads)}


def per_sample_jacobians(model: nn.Module, x: torch.Tensor, output_fn: OutputFn, names: list[str], chunk: int = 64) -> dict[str, torch.Tensor]:
    """Exact per-sample Jacobians {name: (N, K, *shape)} through ``vmap(jacrev(...))``."""
    f = functional(model, output_fn)
    sub = {k: p.detach() for k, p in model.named_parameters() if k in names}

    def single(theta, xn):
        return f(theta, map_tensors(lambda t: t.unsqueeze(0), xn))[0]

    jac = vmap(jacrev(single), in_dims=(None, 0))
    pieces = [jac(sub, take(x, slice(s, s + chunk))) for s in range(0, batch_size_of(x), chunk)]
    return {k: torch.cat([p[k] for p in pieces]) for k in names}


def flat_jacobian(jac: Mapping[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """Per-sample Jacobians as one (N, K, P) tensor, parameters in the order of ``names``."""
    first = jac[names[0]]
    n, k = first.shape[:2]
    return torch.cat([jac[q].reshape(n, k, -1) for q in names], dim=2)


def loss_curvature_factor(logits: torch.Tensor, loss: str) -> torch.Tensor:
    """A_n with A_n A_n^T = Lambda_n, the Hessian of the per-sample loss in the logits: (N, K, K).

    For cross-entropy Lambda = diag(p) - p p^T and A = diag(sqrt p) - p sqrt(p)^T (which squares to it
    because sum p = 1); for the squared error 1/2 ||f - y||^2, Lambda = A = I.
    """
    n, k = logits.shape
    if loss == "mse":
        return torch.eye(k, dtype=logits.dtype, device=logits.device).expand(n, k, k)
    p = torch.softmax(logits, dim=-1)
    s = p.sqrt()
    return torch.diag_embed(s) - p.unsqueeze(2) * s.unsqueeze(1)


def per_sample_loss(logits: torch.Tensor, targets: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "mse":
        return 0.5 * (logits - targets.reshape(logits.shape)).square().sum(-1)
    return F.cross_entropy(logits, targets.long(), reduction="none")


def hessian_vector(model: nn.Module, x: torch.Tensor, targets: torch.Tensor, loss: str, vector: Params) -> dict[str, torch.Tensor]:
    """H v for the mean loss over (x, targets), by differentiating <grad L, v> once more."""
    names = list(vector)
    params = dict(model.named_parameters())
    wanted = [params[k] for k in names]
    with torch.enable_grad():
        logits = output_rows(forward(model, x), logits_of)
        value = per_sample_loss(logits, targets, loss).mean()
        grads = torch.autograd.grad(value, wanted, create_graph=True)
        dot = sum((g * vector[k]).sum() for g, k in zip(grads, names))
        hv = torch.autograd.grad(dot, wanted, allow_unused=True)
    return {k: torch.zeros_like(params[k]) if h is None else h.detach() for k, h in zip(names, hv)}


def ggn_sample(model: nn.Module, x: torch.Tensor, loss: str, names: list[str], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """A draw w ~ N(0, G) with G = (1/N) sum_n J_n^T Lambda_n J_n the Gauss-Newton matrix of the loss.

    w = N^{-1/2} sum_n J_n^T A_n z_n with z_n ~ N(0, I) has covariance exactly G: one backward pass.
    """
    with torch.no_grad():
        logits = output_rows(forward(model, x), logits_of)
    factor = loss_curvature_factor(logits, loss)
    z = torch.randn(logits.shape, generator=generator, dtype=logits.dtype, device="cpu").to(logits.device)
    cotangent = torch.einsum("nkj,nj->nk", factor, z) / batch_size_of(x) ** 0.5
    return vector_jacobian(model, x, logits_of, cotangent, names)
