"""Exact Tr(J_n C J_n^T) per input from per-sample Jacobians (``torch.func``): the oracle for small models.

Jacobians are formed a chunk of inputs at a time; the memory that needs is estimated first and compared
with a limit, so that a model too large for this mode gets a clear error instead of an out-of-memory.
"""

from __future__ import annotations

import torch

from ..batches import batch_size_of, call_args, forward, logits_of, take
from ..errors import ValfreeError
from .linearize import flat_jacobian, loss_curvature_factor, per_sample_jacobians, per_sample_loss
from .noise import DiagonalNoise, NoiseModel, Pruning, SGDNoise, expand_rows
from .per_sample import output_rows
from .trace import chunks, curvature_data, output_width

EXACT_CHUNK = 32


def _check_exact_memory(chunk: int, k: int, p: int, dense_p: bool, itemsize: int, limit: int) -> None:
    # vmap(jacrev) holds about three (chunk, K, P) tensors at once; SGD also holds a dense P x P matrix.
    need = 3 * chunk * k * p * itemsize + (2 * p * p * itemsize if dense_p else 0)
    if need > limit:
        raise ValfreeError(
            f"exact mode needs about {need / 2**30:.2f} GiB (per-sample Jacobians of {chunk} inputs at a time x {k} outputs x "
            f"{p} parameters{', and a dense P x P curvature' if dense_p else ''}), over the limit of {limit / 2**30:.2f} GiB; "
            "use method='trace', or raise max_exact_bytes."
        )


def _jacobian_chunks(model, x, output_fn, names, chunk):
    """Flat per-sample Jacobians (n, K, P), a chunk of inputs at a time."""
    for sl in chunks(batch_size_of(x), chunk):
        yield sl, flat_jacobian(per_sample_jacobians(model, take(x, sl), output_fn, names), names)


def exact_values(model, x, noise: NoiseModel, output_fn, params, batch_size, max_exact_bytes) -> torch.Tensor:
    """(1, N) exact per-input values of Tr(J_n C J_n^T) from per-sample Jacobians."""
    names = list(params)
    n, k = batch_size_of(x), output_width(model, x, output_fn)
    p = sum(t.numel() for t in params.values())
    chunk = min(batch_size, EXACT_CHUNK, n)
    itemsize = next(iter(params.values())).element_size()
    _check_exact_memory(chunk, k, p, isinstance(noise, SGDNoise), itemsize, max_exact_bytes)
    out = torch.zeros(n, dtype=torch.float64)
    if isinstance(noise, DiagonalNoise):
        variances = noise.variances(params)
        # C's diagonal over all parameters in the Jacobian's column order; unperturbed ones get 0.
        c = torch.cat([
            expand_rows(variances[q], params[q]).reshape(-1) if q in variances else torch.zeros_like(params[q]).reshape(-1)
            for q in names
        ])
        for sl, j in _jacobian_chunks(model, x, output_fn, names, chunk):
            out[sl] = (j.square() * c).sum((1, 2)).detach().double().cpu()
    elif isinstance(noise, Pruning):
        dw = noise.direction(params)
        flat_dw = torch.cat([dw[q].reshape(-1) if q in dw else torch.zeros_like(params[q]).reshape(-1) for q in names])
        for sl, j in _jacobian_chunks(model, x, output_fn, names, chunk):
            out[sl] = (j @ flat_dw).square().sum(1).detach().double().cpu()
    elif isinstance(noise, SGDNoise):
        xt, yt = curvature_data(noise, x, params)
        m = dense_curvature(model, xt, yt, noise, names, chunk)
        for sl, j in _jacobian_chunks(model, x, output_fn, names, chunk):
            out[sl] = (noise.scale * torch.einsum("nkp,pq,nkq->n", j, m, j)).detach().double().cpu()
    else:
        raise ValfreeError(f"exact mode does not handle {type(noise).__name__}.")
    return out.unsqueeze(0)


def dense_curvature(model, xt, yt, noise: SGDNoise, names, chunk: int = EXACT_CHUNK) -> torch.Tensor:
    """The P x P curvature M of SGD noise: the Gauss-Newton matrix or the Hessian of the mean loss."""
    if noise.curvature == "ggn":
        m = None
        for sl, jt in _jacobian_chunks(model, xt, logits_of, names, chunk):
            with torch.no_grad():
                logits = output_rows(forward(model, take(xt, sl)), logits_of)
            aj = torch.einsum("nkj,nkp->njp", loss_curvature_factor(logits, noise.loss), jt)
            part = torch.einsum("njp,njq->pq", aj, aj)
            m = part if m is None else m + part
        return m / batch_size_of(xt)
    params = {q: p.detach() for q, p in model.named_parameters() if q in names}
    shapes = [params[q].shape for q in names]
    sizes = [params[q].numel() for q in names]
    flat = torch.cat([params[q].reshape(-1) for q in names])
    from torch.func import functional_call, hessian

    base = {q: p.detach() for q, p in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def mean_loss(theta_flat):
        theta = {q: t.reshape(s) for q, t, s in zip(names, theta_flat.split(sizes), shapes)}
        args, kwargs = call_args(model, xt)
        logits = output_rows(functional_call(model, ({**base, **theta}, buffers), args, kwargs), logits_of)
        return per_sample_loss(logits, yt, noise.loss).mean()

    return hessian(mean_loss)(flat).detach()
