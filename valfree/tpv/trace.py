"""The trace estimators of Tr(H_eff C): per-sample probes for diagonal C, forward mode for pruning, SGD probes.

See :mod:`valfree.tpv.estimators` for the maths of each; every function returns a (draws, inputs) table of
unbiased per-input values, which :func:`valfree.tpv.estimate.summarise` turns into a value and its errors.
"""

from __future__ import annotations

import torch
from torch import nn

from ..batches import batch_size_of, forward, move_to, take
from ..errors import ValfreeError
from .estimate import EstimatorSettings, summarise
from .linearize import ggn_sample, hessian_vector, jacobian_vector
from .noise import DiagonalNoise, SGDNoise
from .per_sample import OutputFn, output_rows, row_squares


def chunks(n: int, size: int) -> list[slice]:
    return [slice(s, min(n, s + size)) for s in range(0, n, size)]


def rademacher(shape, generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8).to(like.dtype) * 2 - 1
    return signs.to(like.device)


def output_width(model: nn.Module, x: torch.Tensor, output_fn: OutputFn) -> int:
    with torch.no_grad():
        return output_rows(forward(model, take(x, slice(0, 1))), output_fn).shape[1]


def trace_diagonal(model, x, noise: DiagonalNoise, output_fn, params, generator,
                   settings: EstimatorSettings) -> torch.Tensor:
    """(probes, N) draws of g_n^T C g_n with g_n = J_n^T u_n, u_n Rademacher: E = Tr(J_n C J_n^T).

    ``settings.probes`` rounds (default 8), more while ``settings.rtol`` is not met, up to ``max_probes``."""
    probes, batch_size, rtol = settings.probes or 8, settings.batch_size, settings.rtol
    variances = noise.variances(params)
    names = list(variances)
    k = output_width(model, x, output_fn)
    rounds: list[torch.Tensor] = []
    while True:
        values = torch.empty(batch_size_of(x), dtype=torch.float64)
        for sl in chunks(batch_size_of(x), batch_size):
            xc = take(x, sl)
            u = rademacher((batch_size_of(xc), k), generator, params[names[0]])
            rows = row_squares(model, xc, u, output_fn, names, settings.engine)
            values[sl] = sum((rows[q] * variances[q]).sum(1) for q in names).detach().double().cpu()
        rounds.append(values)
        if len(rounds) >= max(probes, 2):
            if rtol is None or len(rounds) >= settings.max_probes:
                break
            value, stderr, _, _ = summarise(torch.stack(rounds), shared=False)
            if stderr <= rtol * abs(value):
                break
    return torch.stack(rounds)


def trace_direction(model, x, dw: dict, output_fn, batch_size) -> torch.Tensor:
    """(1, N): ||J_n dw||^2, exact, by forward-mode differentiation."""
    values = [jacobian_vector(model, take(x, sl), output_fn, dw).square().sum(1) for sl in chunks(batch_size_of(x), batch_size)]
    return torch.cat(values).detach().double().cpu().unsqueeze(0)


def curvature_data(noise: SGDNoise, x: torch.Tensor, params) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The training data that define the SGD curvature, on the model's device; labels if the form needs them."""
    xt = noise.inputs if noise.inputs is not None else x
    ref = next(iter(params.values()))
    xt = move_to(xt, ref.device, ref.dtype)
    if noise.curvature == "hessian":
        if noise.targets is None:
            raise ValfreeError(
                "SGD noise with curvature='hessian' needs the training labels: pass targets= to tpv() or "
                "SGDNoise(..., targets=...), or use curvature='ggn', which is label-free."
            )
        y = noise.targets.to(ref.device)
        if y.shape[0] != batch_size_of(xt):
            raise ValfreeError(f"SGD noise has {batch_size_of(xt)} training inputs but {y.shape[0]} targets.")
        return xt, y
    return xt, None


def ggn_draw(model, xt, loss, names, generator, batch_size) -> dict[str, torch.Tensor]:
    """w ~ N(0, G) over all of ``xt``, accumulated over chunks (each chunk's part scaled by its share)."""
    n = batch_size_of(xt)
    total = None
    for sl in chunks(n, batch_size):
        part = ggn_sample(model, take(xt, sl), loss, names, generator)
        scale = ((sl.stop - sl.start) / n) ** 0.5  # ggn_sample divides by sqrt(chunk size)
        total = {k: v * scale for k, v in part.items()} if total is None else {k: total[k] + v * scale for k, v in part.items()}
    return total


def hessian_vector_all(model, xt, yt, loss, vector, batch_size) -> dict[str, torch.Tensor]:
    n = batch_size_of(xt)
    total = None
    for sl in chunks(n, batch_size):
        part = hessian_vector(model, take(xt, sl), yt[sl], loss, vector)
        w = (sl.stop - sl.start) / n
        total = {k: v * w for k, v in part.items()} if total is None else {k: total[k] + v * w for k, v in part.items()}
    return total


def trace_sgd(model, x, noise: SGDNoise, output_fn, params, generator, settings: EstimatorSettings) -> torch.Tensor:
    """(probes, N) draws whose mean is lr/(2b) Tr(J_n M J_n^T), ``settings.probes`` of them (default 8);
    see the module docstring."""
    probes, batch_size = settings.probes or 8, settings.batch_size
    xt, yt = curvature_data(noise, x, params)
    names = list(params)
    rounds = []
    for _ in range(max(probes, 2)):
        if noise.curvature == "ggn":
            w = ggn_draw(model, xt, noise.loss, names, generator, batch_size)
            vals = [jacobian_vector(model, take(x, sl), output_fn, w).square().sum(1) for sl in chunks(batch_size_of(x), batch_size)]
        else:
            v = {k: rademacher(p.shape, generator, p) for k, p in params.items()}
            hv = hessian_vector_all(model, xt, yt, noise.loss, v, batch_size)
            vals = [
                (jacobian_vector(model, take(x, sl), output_fn, v) * jacobian_vector(model, take(x, sl), output_fn, hv)).sum(1)
                for sl in chunks(batch_size_of(x), batch_size)
            ]
        rounds.append(noise.scale * torch.cat(vals).detach().double().cpu())
    return torch.stack(rounds)
