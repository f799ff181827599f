"""Monte Carlo TPV: draw dw from the noise model and measure ||f_{w+dw}(x) - f_w(x)||^2 directly.

No linearisation: where this parts from the trace value as the noise grows, the first-order picture
has stopped holding. Draws are evaluated together with ``torch.func.vmap`` over stacked parameter
sets (``functional_call``), as many at a time as ``memory_bytes`` allows for the activations; a model
that vmap cannot batch is evaluated one draw at a time. The model is in eval mode throughout, so
BatchNorm uses its running statistics and dropout is off.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import vmap

from ..batches import batch_size_of, forward, take
from ..errors import ValfreeError
from .linearize import functional
from .noise import DiagonalNoise, Pruning, SGDNoise
from .trace import curvature_data, ggn_draw

DEFAULT_MEMORY_BYTES = 512 * 2**20


def _activation_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all module outputs in one forward pass on ``x`` (what each extra draw costs)."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        if isinstance(output, torch.Tensor):
            total += output.numel() * output.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    try:
        with torch.no_grad():
            forward(model, x)
    finally:
        for h in handles:
            h.remove()
    return max(total, 1)


def _draws(noise, params, count, generator, sgd_draw):
    if isinstance(noise, DiagonalNoise):
        return [noise.sample(params, generator) for _ in range(count)]
    if isinstance(noise, Pruning):
        return [noise.direction(params)]
    if isinstance(noise, SGDNoise):
        if noise.curvature == "hessian":
            raise ValfreeError(
                "Monte Carlo needs a covariance it can draw from, and the loss Hessian need not be positive "
                "semi-definite; use curvature='ggn' or method='trace' for SGD noise with the Hessian."
            )
        return [sgd_draw() for _ in range(count)]
    raise ValfreeError(f"Monte Carlo does not handle {type(noise).__name__}.")


def monte_carlo(model, x, noise, output_fn, params, draws: int, generator, batch_size, memory_bytes: int = DEFAULT_MEMORY_BYTES) -> torch.Tensor:
    """(draws, N) values ||f_{w+dw_r}(x_n) - f_w(x_n)||^2, one row per draw dw_r."""
    def sgd_draw():
        xt, _ = curvature_data(noise, x, params)
        w = ggn_draw(model, xt, noise.loss, list(params), generator, batch_size)
        return {k: v * noise.scale**0.5 for k, v in w.items()}

    perturbations = _draws(noise, params, draws, generator, sgd_draw)
    f = functional(model, output_fn)
    n = batch_size_of(x)
    per_draw = max(1, int(memory_bytes // (2 * _activation_bytes(model, take(x, slice(0, batch_size))))))
    table = torch.empty(len(perturbations), n, dtype=torch.float64)
    with torch.no_grad():
        for start in range(0, n, batch_size):
            xc = take(x, slice(start, start + batch_size))
            base = f({}, xc)
            for r0 in range(0, len(perturbations), per_draw):
                chunk = perturbations[r0 : r0 + per_draw]
                out = _evaluate(f, params, chunk, xc)
                table[r0 : r0 + len(chunk), start : start + batch_size_of(xc)] = (out - base).square().sum(-1).double().cpu()
    return table


def _evaluate(f, params, chunk: list[dict], xc: torch.Tensor) -> torch.Tensor:
    """Outputs (R, n, K) of the perturbed models w + dw_r, batched over r with vmap when possible."""
    names = sorted({k for dw in chunk for k in dw})
    stacked = {k: params[k].unsqueeze(0) + torch.stack([dw.get(k, torch.zeros_like(params[k])) for dw in chunk]) for k in names}
    try:
        return vmap(lambda theta: f(theta, xc))(stacked)
    except (RuntimeError, NotImplementedError, ValueError):
        # Some modules cannot be batched by vmap; one draw at a time gives the same numbers.
        return torch.stack([f({k: v[r] for k, v in stacked.items()}, xc) for r in range(len(chunk))])
