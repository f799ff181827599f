"""``valfree.tpv``: test prediction variance of a model under a noise model, with its uncertainty.

TPV = E_x E_dw ||f_{w+dw}(x) - f_w(x)||^2 ~= Tr(H_eff C), H_eff = E_x J(x)^T J(x), C = E dw dw^T.

Methods (one call, one result type, whatever the noise):

- ``"trace"``: the first-order value Tr(H_eff C).
  * diagonal C (isotropic, quantization): for each input draw a Rademacher u_n in output space; then
    g_n = J_n^T u_n satisfies E g_n^T C g_n = Tr(J_n C J_n^T). All g_n^T C g_n of a batch come from one
    batched backward pass (:mod:`valfree.tpv.per_sample`).
  * pruning: dw is known, so ||J_n dw||^2 comes exactly from one forward-mode pass.
  * SGD, GGN form: draw w ~ N(0, G) by one backward pass on the training data, then ||J_n w||^2 by
    one forward-mode pass: E = Tr(J_n G J_n^T). Hessian form: v Rademacher in parameter space,
    <J_n v, J_n H v> with H v from a Hessian-vector product: E = Tr(J_n^T J_n H).
  * label noise: the closed form sigma^2 sum_i B_ii / s_i^2 (:mod:`valfree.tpv.label_noise`).
- ``"monte_carlo"``: draw dw from the noise model and measure the change of the outputs directly
  (:mod:`valfree.tpv.monte_carlo`); for label noise, fine-tune on perturbed targets.
- ``"exact"``: Tr(H_eff C) from exact per-sample Jacobians (``torch.func``), for small models; the
  oracle the other methods are tested against.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ..batches import (batch_size_of, collate, concat, describe, forward, input_of, logits_of, move_to, pad_token_id,
                       take)
from ..errors import ValfreeError
from . import label_noise as _label
from .estimate import EstimatorSettings, TPVEstimate, summarise
from .exact import exact_values
from .linearize import trainable
from .noise import DiagonalNoise, LabelNoise, NoiseModel, Pruning, SGDNoise, parse_noise
from .per_sample import ENGINES, OutputFn
from .trace import trace_diagonal, trace_direction, trace_sgd

METHODS = ("trace", "monte_carlo", "exact")
OUTPUTS = ("logits", "probs", "log_probs")
DEFAULT_MAX_EXACT_BYTES = 2 * 2**30


def output_function(outputs: "str | Callable") -> tuple[OutputFn, str]:
    """The map from the model's output to the outputs whose variance is measured, and its name.

    The named outputs start from the logits (:func:`valfree.batches.logits_of`: the output itself, or
    the ``logits`` of a Hugging Face output or dict); a function receives the model's output as it is."""
    if callable(outputs):
        return outputs, getattr(outputs, "__name__", "custom")
    if outputs == "logits":
        return logits_of, outputs
    if outputs == "probs":
        return (lambda out: torch.softmax(logits_of(out), dim=-1)), outputs
    if outputs == "log_probs":
        return (lambda out: torch.log_softmax(logits_of(out), dim=-1)), outputs
    raise ValfreeError(f"outputs must be one of {', '.join(OUTPUTS)} or a function of the model output, not {outputs!r}.")


def as_inputs(inputs, what: str = "inputs", pad_token_id: int = 0):
    """One batch of inputs from a tensor, an (inputs, labels) pair, a dict batch, a Dataset or a DataLoader;
    labels are dropped unread.

    A batch of dicts (a Hugging Face dataset or its DataLoader) gives a dict of keyword inputs
    (``input_ids``, ``attention_mask``...; see :mod:`valfree.batches`), which the model is called with.
    Token ids of unequal length (items of a Dataset, or a DataLoader's batches) are padded with
    ``pad_token_id``, the model's (:func:`valfree.batches.pad_token_id`).
    """
    if isinstance(inputs, torch.Tensor):
        x = inputs
    elif isinstance(inputs, Mapping):
        x = input_of(inputs)
    elif isinstance(inputs, (tuple, list)) and inputs and isinstance(inputs[0], torch.Tensor):
        x = inputs[0]
    elif isinstance(inputs, tuple) and inputs and isinstance(inputs[0], Mapping):
        x = input_of(inputs[0])
    elif isinstance(inputs, DataLoader) or (isinstance(inputs, Iterable) and not isinstance(inputs, (str, bytes, Dataset))):
        x = concat([input_of(b) for b in inputs], pad_token_id)
    elif isinstance(inputs, Dataset):
        x = collate([input_of(inputs[i]) for i in range(len(inputs))], pad_token_id)  # labels stay unread
    else:
        raise ValfreeError(
            f"{what} must be a tensor, an (inputs, labels) pair, a dict batch, a Dataset or a DataLoader, not {type(inputs).__name__}."
        )
    try:
        n = batch_size_of(x)
    except ValfreeError:
        n = 0
    if n < 2:
        raise ValfreeError(
            f"{what} must hold a batch of at least 2 inputs along dim 0 (got {describe(x)}), so that a standard error exists."
        )
    return x


def _prepare(model: nn.Module, x, output_fn: OutputFn, what: str = "inputs") -> tuple[object, dict[str, torch.Tensor]]:
    params = trainable(model)
    if not params:
        raise ValfreeError(f"{type(model).__name__} has no trainable parameters (requires_grad=True), so no perturbation can move its predictions.")
    ref = next(iter(params.values()))
    x = move_to(x, ref.device, ref.dtype)
    try:
        with torch.no_grad():
            out = forward(model, take(x, slice(0, 2)))
            out = output_fn(out)
    except Exception as exc:
        raise ValfreeError(
            f"the model cannot take {what} of shape {describe(x)} ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}); "
            "pass a batch shaped like the model's training inputs, batch first."
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != 2:
        raise ValfreeError(
            f"the measured outputs must be a tensor with the batch along dim 0, but on 2 {what} they are a {type(out).__name__} "
            f"{tuple(getattr(out, 'shape', ()))}; pass outputs=a function that picks the logits, e.g. lambda out: out.logits."
        )
    return x, params


class _EvalMode:
    """Eval mode (BatchNorm on running statistics, dropout off) for the duration, restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.modes = [m.training for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, mode in zip(self.model.modules(), self.modes):
            m.training = mode


def tpv(
    model: nn.Module,
    inputs,
    noise: "NoiseModel | str",
    method: str = "trace",
    *,
    probes: int | None = None,
    seed: int = 0,
    outputs: "str | Callable" = "logits",
    targets: torch.Tensor | None = None,
    batch_size: int = 256,
    engine: str = "hooks",
    rtol: float | None = None,
    max_probes: int = 256,
    max_exact_bytes: int = DEFAULT_MAX_EXACT_BYTES,
    **options,
) -> TPVEstimate:
    """Test prediction variance of ``model`` on ``inputs`` under ``noise``, with its standard errors.

    Args:
        model: the trained network; it is evaluated in eval mode and left in the mode it was in.
        inputs: a batch (tensor, batch first), an (inputs, labels) pair (labels are not read), a Dataset
            or a DataLoader. Training inputs are enough: see :func:`valfree.tpv_stability`.
        noise: a :mod:`valfree.noise` model or a spec such as ``"quant:8"``, ``"iso:1e-3"``,
            ``"sgd:lr=0.1,batch=128"``, ``"label:0.1"``, ``"prune:0.3"``.
        method: ``"trace"`` (first order, Tr(H_eff C)), ``"monte_carlo"`` (draw dw, measure) or
            ``"exact"`` (per-sample Jacobians; small models).
        probes: Rademacher probes per input (trace) or draws of dw (Monte Carlo); default 8 and 32.
        seed: seeds every random draw, so a call is reproducible.
        outputs: ``"logits"`` (default), ``"probs"``, ``"log_probs"`` or a function of the model output.
        targets: training labels, only for SGD noise with ``curvature="hessian"``.
        batch_size: inputs per batched pass (memory bound).
        engine: how the trace estimator gets per-sample gradients: ``"hooks"`` (default), ``"vmap"``,
            ``"loop"`` or ``"backpack"``.
        rtol: keep adding probes until stderr <= rtol * |value| (at most ``max_probes``).
        max_exact_bytes: memory limit for ``method="exact"`` (and the closed-form label noise).
        options: for Monte Carlo, ``memory_bytes``; for label noise, ``rcond``, ``steps``, ``proximity``.

    Returns:
        A :class:`TPVEstimate` with ``value``, ``stderr``, ``input_stderr``, ``probes``, ``seconds``.
    """
    start = time.perf_counter()
    noise = parse_noise(noise)
    if method not in METHODS:
        raise ValfreeError(f"unknown TPV method {method!r}; choose one of {', '.join(METHODS)}.")
    if engine not in ENGINES:
        raise ValfreeError(f"unknown per-sample engine {engine!r}; choose one of {', '.join(ENGINES)}.")
    if probes is not None and (isinstance(probes, bool) or not isinstance(probes, int) or probes < 2):
        raise ValfreeError(f"probes must be an integer of at least 2 (the spread between probes gives the standard error), not {probes!r}.")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValfreeError(f"batch_size must be a positive integer, not {batch_size!r}.")
    output_fn, output_name = output_function(outputs)
    x = as_inputs(inputs, pad_token_id=pad_token_id(model))
    generator = torch.Generator().manual_seed(int(seed))
    with _EvalMode(model):
        x, params = _prepare(model, x, output_fn)
        if isinstance(noise, (SGDNoise, LabelNoise)) and noise.inputs is not None:
            what = "the noise model's training inputs"
            _prepare(model, as_inputs(noise.inputs, what, pad_token_id(model)), output_fn, what)
        if isinstance(noise, SGDNoise) and targets is not None:
            noise = noise.bind(noise.inputs if noise.inputs is not None else x, targets)
        noise = noise.prepare(model, params)
        settings = EstimatorSettings(probes, batch_size, engine, rtol, max_probes, max_exact_bytes, options)
        draws, shared, used, label = _dispatch(model, x, noise, method, output_fn, params, generator, settings)
    value, stderr, input_stderr, per_input = summarise(draws, shared)
    return TPVEstimate(
        value=value, stderr=stderr, input_stderr=input_stderr, probes=used, seconds=time.perf_counter() - start,
        method=label, noise=noise.spec(), n_inputs=batch_size_of(x), outputs=output_name,
        engine=engine if label == "trace" and isinstance(noise, DiagonalNoise) else "", per_input=per_input,
        per_draw=draws.double().mean(1) if shared and draws.shape[0] > 1 else None,
    )


def _dispatch(model, x, noise, method, output_fn, params, generator, settings: EstimatorSettings):
    """(draws, shared, probes used, method label) for one noise model and method."""
    from . import monte_carlo

    probes, batch_size, options = settings.probes, settings.batch_size, settings.options
    if isinstance(noise, LabelNoise):
        if method == "monte_carlo":
            draws = _label.label_noise_empirical(model, x, noise, output_fn, probes or 8, generator, **options)
            return draws, True, draws.shape[0], "fine_tune"
        draws = _label.label_noise_closed_form(model, x, noise, output_fn, batch_size=batch_size, **options)
        return draws, False, 0, "closed_form"
    if method == "exact":
        return exact_values(model, x, noise, output_fn, params, batch_size, settings.max_exact_bytes), False, 0, "exact"
    if method == "monte_carlo":
        draws = monte_carlo.monte_carlo(model, x, noise, output_fn, params, probes or 32, generator, batch_size, **options)
        return draws, True, 0 if isinstance(noise, Pruning) else draws.shape[0], "monte_carlo"
    if options:
        raise ValfreeError(f"method='trace' takes no options {sorted(options)}.")
    if isinstance(noise, DiagonalNoise):
        draws = trace_diagonal(model, x, noise, output_fn, params, generator, settings)
        return draws, False, draws.shape[0], "trace"
    if isinstance(noise, Pruning):
        return trace_direction(model, x, noise.direction(params), output_fn, batch_size), False, 0, "jvp"
    if isinstance(noise, SGDNoise):
        draws = trace_sgd(model, x, noise, output_fn, params, generator, settings)
        return draws, True, draws.shape[0], "trace"
    raise ValfreeError(f"no estimator for noise {noise!r}.")

