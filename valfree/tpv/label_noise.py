"""TPV under label noise: training targets perturbed by eps ~ N(0, sigma^2 I), then refit.

Closed form (first order, minimum-norm refit). With the training Jacobian J_tr = U S V^T (all
training inputs and outputs stacked as rows) the refit moves the weights by dw = J_tr^+ eps, so

    TPV = sigma^2 Tr(H_eff V S^-2 V^T) = sigma^2 sum_i B_ii / s_i^2,   B = V^T H_eff V,

summed over the non-zero singular values (those above ``rcond * s_max``). Per evaluation input x this
is sigma^2 ||J(x) V S^-1||_F^2, which gives a standard error over inputs. For a linear model
f(x) = w^T x it reduces to sigma^2 E_x x^T X^T (X X^T)^-2 X x, i.e. sigma^2 Tr((X X^T)^-1) for
isotropic x. Needs the full Jacobian, so it refuses sets above a stated size.

Empirical form: starting from w*, fit f(w, x_tr) to f(w*, x_tr) + eps by L-BFGS on
1/2 sum ||f - target||^2 + proximity/2 ||w - w*||^2 (its iterates stay in the span of the gradients,
so the first-order solution is the minimum-norm one; the proximity term keeps ill-conditioned
directions from running off), R times, and measure ||f(w_r, x) - f(w*, x)||^2.
"""

from __future__ import annotations

import torch

from ..batches import batch_size_of, move_to, take
from ..errors import ValfreeError
from .linearize import flat_jacobian, functional, per_sample_jacobians, trainable
from .noise import LabelNoise

DEFAULT_MAX_ELEMENTS = 2 * 10**7


def _training_inputs(noise: LabelNoise, x, model) -> torch.Tensor:
    """The training inputs on the model's device, floating ones in its dtype (as tpv() moved ``x``)."""
    xt = noise.inputs if noise.inputs is not None else x
    ref = next(iter(trainable(model).values()))
    return move_to(xt, ref.device, ref.dtype)


def label_noise_closed_form(
    model, x, noise: LabelNoise, output_fn, max_elements: int = DEFAULT_MAX_ELEMENTS, batch_size: int = 256,
    rcond: float | None = None,
) -> torch.Tensor:
    """(1, N) per-input values sigma^2 ||J(x_n) V S^-1||_F^2; see the module docstring."""
    xt = _training_inputs(noise, x, model)
    params = trainable(model)
    names = list(params)
    p = sum(t.numel() for t in params.values())
    with torch.no_grad():
        k = functional(model, output_fn)({}, take(x, slice(0, 1))).shape[1]
    elements = (batch_size_of(xt) + batch_size_of(x)) * k * p
    if elements > max_elements:
        raise ValfreeError(
            f"the closed-form label-noise TPV needs Jacobians of {batch_size_of(xt)} training + {batch_size_of(x)} evaluation inputs x {k} outputs x "
            f"{p} parameters = {elements:.3g} entries, above the limit of {max_elements:.3g}; use fewer inputs or method='monte_carlo' (fine-tuning)."
        )
    jt = flat_jacobian(per_sample_jacobians(model, xt, output_fn, names), names).reshape(-1, p)
    _, s, vh = torch.linalg.svd(jt, full_matrices=False)
    tol = (rcond if rcond is not None else max(jt.shape) * torch.finfo(s.dtype).eps) * s.max()
    keep = s > tol
    basis = vh[keep].T / s[keep]  # V S^-1, (P, r)
    values = []
    for start in range(0, batch_size_of(x), batch_size):
        je = flat_jacobian(per_sample_jacobians(model, take(x, slice(start, start + batch_size)), output_fn, names), names)
        values.append((je @ basis).square().sum((1, 2)))
    return (noise.sigma**2 * torch.cat(values)).detach().double().cpu().unsqueeze(0)


def label_noise_empirical(
    model, x, noise: LabelNoise, output_fn, repeats: int, generator: torch.Generator,
    steps: int = 100, proximity: float = 1e-4,
) -> torch.Tensor:
    """(repeats, N): ||f(w_r, x_n) - f(w*, x_n)||^2 after refitting to noisy targets, once per repeat."""
    if steps < 1 or proximity < 0:
        raise ValfreeError(f"label-noise fine-tuning needs steps >= 1 and proximity >= 0 (got steps={steps}, proximity={proximity}).")
    xt = _training_inputs(noise, x, model)
    f = functional(model, output_fn)
    start = trainable(model)
    with torch.no_grad():
        clean_train, clean_eval = f({}, xt), f({}, x)
    table = torch.empty(repeats, batch_size_of(x), dtype=torch.float64)
    for r in range(repeats):
        eps = torch.randn(clean_train.shape, generator=generator, dtype=clean_train.dtype, device="cpu").to(clean_train.device)
        target = clean_train + noise.sigma * eps
        theta = {k: v.clone().requires_grad_(True) for k, v in start.items()}
        optimizer = torch.optim.LBFGS(list(theta.values()), max_iter=steps, history_size=50, line_search_fn="strong_wolfe",
                                      tolerance_grad=1e-12, tolerance_change=1e-15)

        def closure():
            optimizer.zero_grad()
            loss = 0.5 * (f(theta, xt) - target).square().sum()
            if proximity:
                loss = loss + 0.5 * proximity * sum((theta[k] - start[k]).square().sum() for k in theta)
            loss.backward()
            return loss

        with torch.enable_grad():
            optimizer.step(closure)
        with torch.no_grad():
            table[r] = (f(theta, x) - clean_eval).square().sum(1).double().cpu()
    return table
