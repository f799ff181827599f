"""Per-sample squared gradients of s = sum_n <u_n, f(x_n)>, row by row, from one batched backward pass.

The gradient of <u_n, f(x_n)> alone is g_n = J_n^T u_n. For every trainable parameter this module
returns the *row squares* R[n, r] = sum of g_n^2 over row r (the slice along dim 0: an output channel
of a weight, one entry of a bias). Summed over rows they give ||g_n||^2 per tensor; weighted by a
per-row variance they give g_n^T C g_n for any C that is diagonal and constant within rows, which is
what the trace estimator of Tr(H_eff C) needs (E_u g_n^T C g_n = Tr(J_n C J_n^T) for Rademacher u_n).

Engines, all returning the same numbers:

- ``"hooks"`` (default): forward hooks keep each layer's input x and a tensor hook keeps the gradient
  delta of its output; one ``torch.autograd.grad`` over the batch then gives every delta, and layer
  rules turn (x, delta) into row squares without forming per-sample gradients where they can:
  Linear ``||delta_n||^2 ||x_n||^2`` per row (over tokens: the Gram form
  ``delta^T (X X^T) delta``), convolution through ``unfold`` (materialised or Gram, whichever is
  cheaper), BatchNorm in eval mode and LayerNorm through the normalised input, Embedding through the
  token Gram matrix. Parameters without a rule (or in a module called twice, or shared between
  modules) go to the ``vmap`` engine.
- ``"vmap"``: ``torch.func.vmap`` over ``torch.func.grad`` of the single-sample function.
- ``"loop"``: one backward pass per sample, the way the paper's code does it (a baseline).
- ``"backpack"``: BackPACK's ``BatchGrad`` extension, where BackPACK supports the model (optional).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap

from ..batches import batch_size_of, call_args, forward, map_tensors, take
from ..errors import ValfreeError
from ..probes import gram_is_cheaper

OutputFn = Callable[[torch.Tensor], torch.Tensor]
ENGINES = ("hooks", "vmap", "loop", "backpack")


def rows_of(g: torch.Tensor) -> torch.Tensor:
    """Per-sample row squares of a batch of per-sample gradients (N, *shape) -> (N, rows)."""
    n = g.shape[0]
    g = g.reshape(n, g.shape[1], -1) if g.dim() >= 2 else g.reshape(n, 1, 1)
    return g.square().sum(-1)


def output_rows(out: torch.Tensor, output_fn: OutputFn) -> torch.Tensor:
    """The measured outputs f(x) as (N, K): ``output_fn`` applied to the model output, flattened per sample."""
    f = output_fn(out)
    return f.reshape(f.shape[0], -1)


# ----- layer rules: (module, saved input, output gradient) -> {local parameter name: (N, rows)} --------


def _linear_rows(m: nn.Linear, x: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    n = x.shape[0]
    out = {}
    if x.dim() == 2:
        # g_n = delta_n x_n^T, so row o of g_n has squared norm delta_no^2 ||x_n||^2.
        d2 = delta.square()
        out["weight"] = d2 * x.square().sum(1, keepdim=True)
        bias = delta
    else:
        # Over tokens g_n = sum_t delta_nt x_nt^T; the product form no longer holds.
        x = x.reshape(n, -1, x.shape[-1])
        d = delta.reshape(n, -1, delta.shape[-1])
        t, i, o = x.shape[1], x.shape[2], d.shape[2]
        if gram_is_cheaper(t, o, i):
            gram = torch.bmm(x, x.transpose(1, 2))  # (N, T, T)
            out["weight"] = torch.einsum("nto,nts,nso->no", d, gram, d)
        else:
            out["weight"] = torch.einsum("nto,nti->noi", d, x).square().sum(-1)
        bias = d.sum(1)
    if m.bias is not None:
        out["bias"] = bias.square()
    return out


def conv_supported(m: nn.Module) -> bool:
    return (
        isinstance(m, (nn.Conv1d, nn.Conv2d))
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
    )


def _conv_rows(m: nn.Module, x: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    if isinstance(m, nn.Conv1d):  # a 1-d convolution is a 2-d one over a height of 1
        x, delta = x.unsqueeze(2), delta.unsqueeze(2)
        kernel, dilation, padding, stride = (1, *m.kernel_size), (1, *m.dilation), (0, *m.padding), (1, *m.stride)
    else:
        kernel, dilation, padding, stride = m.kernel_size, m.dilation, m.padding, m.stride
    n, g = x.shape[0], m.groups
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # (N, C_in k k, L)
    L = cols.shape[-1]
    cols = cols.reshape(n, g, -1, L)
    d = delta.reshape(n, g, -1, L)
    i, o = cols.shape[2], d.shape[2]
    # g_n = delta_n cols_n^T per group: materialise it, or use the L x L Gram of the patches.
    if gram_is_cheaper(L, o, i):
        gram = torch.einsum("ngil,ngim->nglm", cols, cols)
        w = torch.einsum("ngol,nglm,ngom->ngo", d, gram, d)
    else:
        w = torch.einsum("ngol,ngil->ngoi", d, cols).square().sum(-1)
    out = {"weight": w.reshape(n, -1)}
    if m.bias is not None:
        out["bias"] = delta.reshape(n, delta.shape[1], -1).sum(-1).square()
    return out


def _norm_rows(x_hat: torch.Tensor, delta: torch.Tensor, m: nn.Module, leading: tuple[int, ...]) -> dict[str, torch.Tensor]:
    out = {}
    for name, factor in (("weight", x_hat), ("bias", None)):
        if getattr(m, name, None) is None or not m.get_parameter(name).requires_grad:
            continue
        g = delta * factor if factor is not None else delta
        g = g.sum(dim=leading) if leading else g  # per-sample gradient, shaped like the parameter
        out[name] = rows_of(g)
    return out


def _batchnorm_rows(m: nn.modules.batchnorm._BatchNorm, x: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    shape = (1, -1) + (1,) * (x.dim() - 2)
    x_hat = (x - m.running_mean.reshape(shape)) * torch.rsqrt(m.running_var.reshape(shape) + m.eps)
    return _norm_rows(x_hat, delta, m, tuple(range(2, x.dim())))


def _layernorm_rows(m: nn.LayerNorm, x: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    x_hat = F.layer_norm(x, m.normalized_shape, None, None, m.eps)
    k = len(m.normalized_shape)
    return _norm_rows(x_hat, delta, m, tuple(range(1, x.dim() - k)))


def _embedding_rows(m: nn.Embedding, idx: torch.Tensor, delta: torch.Tensor) -> dict[str, torch.Tensor]:
    n = idx.shape[0]
    idx = idx.reshape(n, -1)
    d = delta.reshape(n, idx.shape[1], -1)
    if m.padding_idx is not None:  # the padding row gets no gradient
        d = d * (idx != m.padding_idx).unsqueeze(-1)
    # Row v of g_n is sum_{t: idx_t = v} delta_t, so ||row v||^2 = sum over token pairs hitting v.
    same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(d.dtype)
    pair = torch.bmm(d, d.transpose(1, 2)) * same
    rows = torch.zeros(n, m.num_embeddings, dtype=d.dtype, device=d.device)
    rows.scatter_add_(1, idx, pair.sum(2))
    return {"weight": rows}


def _rule_for(m: nn.Module):
    if isinstance(m, nn.Linear):
        return _linear_rows
    if conv_supported(m):
        return _conv_rows
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.training and m.running_mean is not None:
        return _batchnorm_rows
    if isinstance(m, nn.LayerNorm):
        return _layernorm_rows
    if isinstance(m, nn.Embedding) and not m.scale_grad_by_freq:
        return _embedding_rows
    return None


@dataclass
class _Capture:
    calls: int = 0
    x: torch.Tensor | None = None
    out: torch.Tensor | None = None
    version: int = 0
    delta: torch.Tensor | None = None


@dataclass
class _Plan:
    """Which modules the hook rules cover, and which parameters must take the fallback."""

    modules: dict[str, nn.Module] = field(default_factory=dict)
    rules: dict[str, Callable] = field(default_factory=dict)


def _plan(model: nn.Module) -> _Plan:
    owners: dict[int, list[str]] = {}
    for mod_name, m in model.named_modules():
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(mod_name)
    plan = _Plan()
    for mod_name, m in model.named_modules():
        own = list(m.named_parameters(recurse=False))
        rule = _rule_for(m)
        if rule is None or not any(p.requires_grad for _, p in own):
            continue
        if any(len(owners[id(p)]) > 1 for _, p in own):
            continue  # a tied parameter's per-sample gradient is a sum over its users
        plan.modules[mod_name] = m
        plan.rules[mod_name] = rule
    return plan


def _qualified(mod_name: str, local: str) -> str:
    return f"{mod_name}.{local}" if mod_name else local


def hooks_row_squares(
    model: nn.Module, x: torch.Tensor, u: torch.Tensor, output_fn: OutputFn, names: list[str]
) -> dict[str, torch.Tensor]:
    """Row squares for ``names`` from one batched backward; see the module docstring."""
    plan = _plan(model)
    captures = {k: _Capture() for k in plan.modules}
    handles = []

    def make_hook(key):
        def hook(module, args, output):
            cap = captures[key]
            cap.calls += 1
            if cap.calls > 1 or not args or not isinstance(output, torch.Tensor) or not output.requires_grad:
                return
            cap.x, cap.out, cap.version = args[0].detach(), output, output._version

            def keep(g):
                cap.delta = g

            output.register_hook(keep)

        return hook

    for key, m in plan.modules.items():
        handles.append(m.register_forward_hook(make_hook(key)))
    try:
        return _rows_from_captures(model, x, u, output_fn, names, plan, captures, handles)
    finally:
        # Each captured output holds a tensor hook whose closure holds the capture, which holds the
        # output: a cycle through autograd's C++ hook table that Python's collector cannot see. Left
        # alone, it keeps the whole graph (every saved activation) alive after the call returns.
        for c in captures.values():
            c.x = c.out = c.delta = None


def _rows_from_captures(model, x, u, output_fn, names, plan: _Plan, captures: dict, handles: list) -> dict[str, torch.Tensor]:
    try:
        f = output_rows(forward(model, x), output_fn)
    finally:
        for h in handles:
            h.remove()
    n = batch_size_of(x)
    _check_cotangent(f, u)
    covered = {
        k for k, c in captures.items()
        if c.calls == 1 and c.out is not None and c.x is not None and c.x.shape[:1] == (n,) and c.out.shape[:1] == (n,)
    }
    # Ask autograd for the layer outputs themselves (no weight gradients are formed); an output that a
    # later in-place op rewrote is reached through its layer's parameters instead.
    targets = []
    for k in covered:
        c = captures[k]
        targets.append(c.out if c.out._version == c.version else next(p for p in plan.modules[k].parameters(recurse=False) if p.requires_grad))
    if targets:
        torch.autograd.grad((f * u).sum(), targets, allow_unused=True)
    rows: dict[str, torch.Tensor] = {}
    wanted = set(names)
    for k in covered:
        c, m = captures[k], plan.modules[k]
        if c.delta is None:  # the layer does not reach the output
            delta = torch.zeros_like(c.out)
        else:
            delta = c.delta
        for local, r in plan.rules[k](m, c.x, delta.detach()).items():
            q = _qualified(k, local)
            if q in wanted:
                rows[q] = r
    rest = [q for q in names if q not in rows]
    if rest:
        try:
            rows.update(vmap_row_squares(model, x, u, output_fn, rest))
        except (RuntimeError, NotImplementedError):
            # Models with data-dependent control flow (Hugging Face attention masks check their
            # values) cannot run under vmap; one pass per sample gives the same numbers.
            rows.update(loop_row_squares(model, x, u, output_fn, rest))
    return {q: rows[q] for q in names}


def _check_cotangent(f: torch.Tensor, u: torch.Tensor) -> None:
    if f.shape != u.shape:
        raise ValfreeError(f"the probe vectors have shape {tuple(u.shape)} but the outputs have {tuple(f.shape)}.")


def vmap_row_squares(
    model: nn.Module, x: torch.Tensor, u: torch.Tensor, output_fn: OutputFn, names: list[str], chunk: int | None = None
) -> dict[str, torch.Tensor]:
    """Row squares through ``torch.func.vmap(grad(...))`` over samples, ``chunk`` samples at a time."""
    params = {k: p.detach() for k, p in model.named_parameters()}
    buffers = dict(model.named_buffers())
    sub = {k: params[k] for k in names}

    def single(theta, xn, un):
        args, kwargs = call_args(model, map_tensors(lambda t: t.unsqueeze(0), xn))
        out = functional_call(model, ({**params, **theta}, buffers), args, kwargs)
        return (output_rows(out, output_fn)[0] * un).sum()

    per_sample = vmap(grad(single), in_dims=(None, 0, 0))
    n = batch_size_of(x)
    size = sum(p.numel() for p in sub.values())
    chunk = chunk or max(1, min(n, int(2**26 // max(size, 1))))
    pieces: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for start in range(0, n, chunk):
        g = per_sample(sub, take(x, slice(start, start + chunk)), u[start : start + chunk])
        for k in names:
            pieces[k].append(rows_of(g[k]))
    return {k: torch.cat(v) for k, v in pieces.items()}


def loop_row_squares(
    model: nn.Module, x: torch.Tensor, u: torch.Tensor, output_fn: OutputFn, names: list[str]
) -> dict[str, torch.Tensor]:
    """Row squares from one forward and backward pass per sample (the paper's way; a baseline)."""
    params = dict(model.named_parameters())
    wanted = [params[k] for k in names]
    pieces: dict[str, list[torch.Tensor]] = {k: [] for k in names}
    for i in range(batch_size_of(x)):
        f = output_rows(forward(model, take(x, slice(i, i + 1))), output_fn)
        grads = torch.autograd.grad((f[0] * u[i]).sum(), wanted, allow_unused=True)
        for k, g, p in zip(names, grads, wanted):
            g = torch.zeros_like(p) if g is None else g
            pieces[k].append(rows_of(g.unsqueeze(0)))
    return {k: torch.cat(v) for k, v in pieces.items()}


def backpack_row_squares(
    model: nn.Module, x: torch.Tensor, u: torch.Tensor, output_fn: OutputFn, names: list[str]
) -> dict[str, torch.Tensor]:
    """Row squares from BackPACK's ``BatchGrad`` (per-sample gradients), for models BackPACK supports."""
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad
    except ImportError:
        raise ValfreeError("the 'backpack' engine needs BackPACK: pip install backpack-for-pytorch.") from None
    # BackPACK installs hooks on the modules it extends: work on a copy so the user's model stays as it was.
    model = extend(copy.deepcopy(model))
    params = dict(model.named_parameters())
    try:
        f = output_rows(forward(model, x), output_fn)
        with warnings.catch_warnings(), backpack(BatchGrad()):
            warnings.simplefilter("ignore", UserWarning)  # it warns about containers, which hold no own weights
            (f * u).sum().backward()
        return {k: rows_of(params[k].grad_batch) for k in names}
    except Exception as exc:  # BackPACK raises many types for layers it does not know
        raise ValfreeError(f"BackPACK cannot handle this model ({type(exc).__name__}: {exc}); use engine='hooks'.") from None


_ENGINES = {
    "hooks": hooks_row_squares,
    "vmap": vmap_row_squares,
    "loop": loop_row_squares,
    "backpack": backpack_row_squares,
}


def row_squares(
    model: nn.Module, x: torch.Tensor, u: torch.Tensor, output_fn: OutputFn, names: list[str], engine: str = "hooks"
) -> dict[str, torch.Tensor]:
    """Per-sample row squares of the gradient of sum_n <u_n, f(x_n)> for the parameters ``names``.

    ``x`` is a batch of N inputs, ``u`` the (N, K) output-space vectors, ``output_fn`` maps the model's
    output to the measured outputs. Returns {name: (N, rows)}. The model should be in eval mode, so that
    each f(x_n) depends on x_n alone.
    """
    if engine not in _ENGINES:
        raise ValfreeError(f"unknown per-sample engine {engine!r}; choose one of {', '.join(ENGINES)}.")
    with torch.enable_grad():
        return _ENGINES[engine](model, x, u, output_fn, names)
