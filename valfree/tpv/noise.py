"""Noise models: the covariance C of a parameter perturbation dw, and how to draw dw.

TPV ~= Tr(H_eff C) separates the model's geometry (H_eff = E_x J^T J) from the noise mechanism (C).
Each class below is one mechanism and states its C:

- :class:`Isotropic` ``(sigma)``: C = sigma^2 I.
- :class:`Quantization` ``(bits, granularity)``: uniform rounding to a grid of step
  delta = range / (2^bits - 1), modelled as independent uniform error, so C = diag(delta^2 / 12).
  ``range = max(w) - min(w)`` over the whole model (``"global"``), each tensor (``"tensor"``) or each
  output channel, i.e. each slice along dim 0 (``"channel"``; 1-d tensors such as biases use their
  tensor range there, since a channel of a bias is a single number).
- :class:`SGDNoise` ``(lr, batch_size)``: the stationary SGD covariance C = lr / (2 b) M, with M the
  loss Hessian (``curvature="hessian"``, needs labels) or its label-free Gauss-Newton part
  (``curvature="ggn"``: E_x J^T Lambda J, Lambda the Hessian of the loss in the logits).
- :class:`LabelNoise` ``(sigma)``: labels perturbed by N(0, sigma^2) and refit to the minimum-norm
  solution, dw = J_tr^+ eps, so C = sigma^2 J_tr^+ J_tr^+T.
- :class:`Pruning` ``(mask)``: the deterministic dw = -w on the masked entries, C = dw dw^T.

Diagonal noises (isotropic, quantization) give their C as one variance per row (slice along dim 0)
of each parameter tensor; that is all the trace estimator needs, because it sums per-sample squared
gradients row by row. Strings such as ``"quant:4:channel"`` become noise models via :func:`parse_noise`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Mapping

import torch
from torch import nn

from ..errors import ValfreeError

Params = Mapping[str, torch.Tensor]
GRANULARITIES = ("tensor", "channel", "global")
SPEC_HELP = (
    "use iso:SIGMA, quant:BITS[:tensor|channel|global], sgd:lr=LR,batch=B[,curvature=ggn|hessian], "
    "label:SIGMA or prune:FRACTION"
)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """The tensor as (rows, rest): rows are slices along dim 0 (a scalar is one row)."""
    return t.reshape(t.shape[0], -1) if t.dim() >= 1 else t.reshape(1, 1)


def expand_rows(row_values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast one value per row (dim-0 slice) to the full shape of ``like``."""
    return row_values.reshape((-1,) + (1,) * max(like.dim() - 1, 0)).expand_as(like) if like.dim() else row_values.reshape(())


class NoiseModel:
    """A parameter perturbation dw with covariance C. Subclasses say which form C has: diagonal (one
    variance per row), a deterministic direction, curvature (lr/2b * M) or label noise (sigma^2 J^+ J^+T);
    the estimators dispatch on the subclass."""

    def prepare(self, model: nn.Module, params: Params) -> "NoiseModel":
        """Resolve anything that depends on the model (names to skip, masks); checks them too."""
        return self

    def spec(self) -> str:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.spec()


class DiagonalNoise(NoiseModel):
    """C is diagonal and constant within each row of each tensor: C = diag(c_{p,r})."""

    def variances(self, params: Params) -> dict[str, torch.Tensor]:
        """Per-row variance c_{p,r} (a tensor of length rows) for each perturbed parameter.

        Parameters left out of the dict are not perturbed.
        """
        raise NotImplementedError

    def sample(self, params: Params, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One draw dw with covariance C, per perturbed parameter."""
        raise NotImplementedError


@dataclass(frozen=True)
class Isotropic(DiagonalNoise):
    """Gaussian noise on every trainable weight: dw ~ N(0, sigma^2 I), so Tr(H_eff C) = sigma^2 Tr(H_eff)."""

    sigma: float

    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValfreeError(f"isotropic noise needs a finite sigma > 0, not {self.sigma!r}.")

    def variances(self, params: Params) -> dict[str, torch.Tensor]:
        return {n: torch.full((_rows(p).shape[0],), self.sigma**2, dtype=p.dtype, device=p.device) for n, p in params.items()}

    def sample(self, params: Params, generator: torch.Generator) -> dict[str, torch.Tensor]:
        return {n: self.sigma * _randn_like(p, generator) for n, p in params.items()}

    def spec(self) -> str:
        return f"iso:{self.sigma:g}"


@dataclass(frozen=True)
class Quantization(DiagonalNoise):
    """Uniform ``bits``-bit rounding, modelled as dw ~ U(-delta/2, delta/2) independently per weight.

    delta = (max w - min w) / (2^bits - 1) over the chosen ``granularity`` ("tensor", "channel" or
    "global"), so each weight gets variance delta^2 / 12. ``skip`` names modules kept in full precision
    (their parameters, and those of their submodules, are not perturbed); the name ``"head"`` stands for
    the classifier head that :func:`valfree.find_head` finds.
    """

    bits: int
    granularity: str = "tensor"
    skip: tuple[str, ...] = ()

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int) or not 1 <= self.bits <= 32:
            raise ValfreeError(f"quantization needs an integer number of bits from 1 to 32, not {self.bits!r}.")
        if self.granularity not in GRANULARITIES:
            raise ValfreeError(f"quantization granularity must be one of {', '.join(GRANULARITIES)}, not {self.granularity!r}.")
        object.__setattr__(self, "skip", tuple([self.skip] if isinstance(self.skip, str) else self.skip))

    def prepare(self, model: nn.Module, params: Params) -> "Quantization":
        if "head" not in self.skip or _has_module(model, "head"):
            names = self.skip
        else:
            from ..probes import find_head

            names = tuple(find_head(model).name if s == "head" else s for s in self.skip)
        modules = {n for n, _ in model.named_modules()}
        unknown = [s for s in names if s not in modules]
        if unknown:
            raise ValfreeError(f"quantization skip list names {unknown} but the model has no such module; use names from model.named_modules().")
        kept = [n for n in params if not _skipped(n, names)]
        if not kept:
            raise ValfreeError("the quantization skip list covers every trainable parameter, so nothing would be quantized.")
        return replace(self, skip=names)

    def steps(self, params: Params) -> dict[str, torch.Tensor]:
        """The grid step delta per row of each quantized parameter."""
        levels = 2**self.bits - 1
        quantized = {n: p for n, p in params.items() if not _skipped(n, self.skip)}
        if self.granularity == "global":
            lo = min(float(p.min()) for p in quantized.values())
            hi = max(float(p.max()) for p in quantized.values())
            return {n: torch.full((_rows(p).shape[0],), (hi - lo) / levels, dtype=p.dtype, device=p.device) for n, p in quantized.items()}
        out = {}
        for n, p in quantized.items():
            rows = _rows(p.detach())
            if self.granularity == "channel" and p.dim() >= 2:
                out[n] = (rows.amax(1) - rows.amin(1)) / levels
            else:
                out[n] = ((rows.max() - rows.min()) / levels).expand(rows.shape[0]).clone()
        return out

    def variances(self, params: Params) -> dict[str, torch.Tensor]:
        return {n: d**2 / 12 for n, d in self.steps(params).items()}

    def sample(self, params: Params, generator: torch.Generator) -> dict[str, torch.Tensor]:
        out = {}
        for n, d in self.steps(params).items():
            p = params[n]
            uniform = torch.rand(p.shape, generator=generator, dtype=p.dtype, device="cpu").to(p.device) - 0.5
            out[n] = uniform * expand_rows(d, p)
        return out

    def rounding(self, params: Params) -> dict[str, torch.Tensor]:
        """The actual rounding error Q(w) - w on the same grid (deterministic, for a direct check)."""
        out = {}
        for n, d in self.steps(params).items():
            p = params[n].detach()
            step = expand_rows(d, p)
            rows = _rows(p)
            if self.granularity == "channel" and p.dim() >= 2:
                lo = expand_rows(rows.amin(1), p)
            elif self.granularity == "global":
                lo = torch.full_like(p, min(float(q.min()) for k, q in params.items() if not _skipped(k, self.skip)))
            else:
                lo = torch.full_like(p, float(rows.min()))
            safe = torch.where(step > 0, step, torch.ones_like(step))
            q = torch.where(step > 0, lo + torch.round((p - lo) / safe) * safe, p)
            out[n] = q - p
        return out

    def spec(self) -> str:
        return f"quant:{self.bits}:{self.granularity}"


@dataclass(frozen=True)
class Pruning(NoiseModel):
    """Removing weights: the deterministic dw = -w on the masked entries, so C = dw dw^T.

    ``mask`` maps parameter names to boolean tensors (True = removed), shaped like the parameter or
    like its first dimension (whole output channels). Alternatively ``amount`` in (0, 1) builds a
    global magnitude mask: the smallest ``amount`` fraction of all weights in tensors with 2+ dims.
    """

    mask: Mapping[str, torch.Tensor] | None = None
    amount: float | None = None
    def __post_init__(self):
        if self.mask is None and self.amount is None:
            raise ValfreeError("Pruning needs a mask (parameter name -> bool tensor) or an amount in (0, 1).")
        if self.amount is not None and not 0 < self.amount < 1:
            raise ValfreeError(f"the pruning amount is the fraction of weights removed and must lie in (0, 1), not {self.amount!r}.")
        if self.mask is not None and not any(bool(torch.as_tensor(m).any()) for m in self.mask.values()):
            raise ValfreeError("the pruning mask is empty (no entry is True), so it removes nothing; mark removed weights with True.")

    def prepare(self, model: nn.Module, params: Params) -> "Pruning":
        mask = self.mask if self.mask is not None else magnitude_mask(params, self.amount)
        resolved = {}
        for name, m in mask.items():
            if name not in params:
                raise ValfreeError(
                    f"the pruning mask names {name!r}, which is not a trainable parameter of the model; "
                    "use names from model.named_parameters()."
                )
            p = params[name]
            m = torch.as_tensor(m, device=p.device).bool()
            if m.shape == p.shape:
                resolved[name] = m
            elif p.dim() >= 1 and m.shape == p.shape[:1]:
                resolved[name] = expand_rows(m, p)
            else:
                raise ValfreeError(
                    f"the pruning mask for {name!r} has shape {tuple(m.shape)}; it must match the parameter "
                    f"{tuple(p.shape)} or its first dimension."
                )
        return replace(self, mask=resolved)

    def direction(self, params: Params) -> dict[str, torch.Tensor]:
        """dw = -w where the mask is True, 0 elsewhere."""
        return {n: -params[n].detach() * m for n, m in self.mask.items()}

    def spec(self) -> str:
        if self.amount is not None:
            return f"prune:{self.amount:g}"
        removed = sum(int(torch.as_tensor(m).sum()) for m in self.mask.values())
        return f"prune:mask({removed} weights)"


def magnitude_mask(params: Params, amount: float) -> dict[str, torch.Tensor]:
    """True for the ``amount`` fraction of smallest-|w| entries among all tensors with 2+ dims."""
    weights = {n: p.detach() for n, p in params.items() if p.dim() >= 2}
    if not weights:
        raise ValfreeError("magnitude pruning needs weight tensors with 2 or more dims, and the model has none.")
    flat = torch.cat([w.abs().flatten() for w in weights.values()])
    k = max(1, int(round(amount * flat.numel())))
    threshold = flat.kthvalue(k).values
    return {n: w.abs() <= threshold for n, w in weights.items()}


@dataclass(frozen=True)
class SGDNoise(NoiseModel):
    """Stationary SGD noise around a minimum: C = lr / (2 batch_size) * M.

    M is the loss Hessian (``curvature="hessian"``: needs ``targets``, estimated through Hessian-vector
    products) or its Gauss-Newton part E_x J^T Lambda J (``curvature="ggn"``, label-free, the form the
    paper's code uses), with Lambda = diag(p) - p p^T for ``loss="ce"`` and I for ``loss="mse"``
    (per-sample loss 1/2 ||f - y||^2). ``inputs`` / ``targets`` are the training data that define M;
    when left out, the inputs given to :func:`valfree.tpv` are used.
    """

    lr: float
    batch_size: int
    curvature: str = "ggn"
    loss: str = "ce"
    inputs: torch.Tensor | None = field(default=None, repr=False, compare=False)
    targets: torch.Tensor | None = field(default=None, repr=False, compare=False)
    def __post_init__(self):
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValfreeError(f"SGD noise needs a learning rate lr > 0, not {self.lr!r}.")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValfreeError(f"SGD noise needs an integer batch size of at least 1, not {self.batch_size!r}.")
        if self.curvature not in ("ggn", "hessian"):
            raise ValfreeError(f"SGD noise curvature must be 'ggn' (label-free) or 'hessian' (needs labels), not {self.curvature!r}.")
        if self.loss not in ("ce", "mse"):
            raise ValfreeError(f"SGD noise loss must be 'ce' or 'mse', not {self.loss!r}.")

    @property
    def scale(self) -> float:
        """lr / (2 b), the factor in front of the curvature."""
        return self.lr / (2 * self.batch_size)

    def bind(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> "SGDNoise":
        """This noise with its training data set, unless it already has some."""
        if self.inputs is not None:
            return self
        return replace(self, inputs=inputs, targets=targets if self.targets is None else self.targets)

    def spec(self) -> str:
        return f"sgd:lr={self.lr:g},batch={self.batch_size},curvature={self.curvature},loss={self.loss}"


@dataclass(frozen=True)
class LabelNoise(NoiseModel):
    """Training targets perturbed by eps ~ N(0, sigma^2 I) and refit: dw = J_tr^+ eps.

    Hence C = sigma^2 J_tr^+ J_tr^+T and, with J_tr = U S V^T, TPV = sigma^2 sum_i B_ii / s_i^2 where
    B = V^T H_eff V. ``inputs`` is the training set the labels belong to (default: the inputs given to
    :func:`valfree.tpv`).
    """

    sigma: float
    inputs: torch.Tensor | None = field(default=None, repr=False, compare=False)
    def __post_init__(self):
        if not (isinstance(self.sigma, (int, float)) and math.isfinite(self.sigma) and self.sigma > 0):
            raise ValfreeError(f"label noise needs a finite sigma > 0, not {self.sigma!r}.")

    def bind(self, inputs: torch.Tensor, targets: torch.Tensor | None = None) -> "LabelNoise":
        return self if self.inputs is not None else replace(self, inputs=inputs)

    def spec(self) -> str:
        return f"label:{self.sigma:g}"


def _randn_like(p: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # Draw on the CPU generator so that a seed gives the same noise on every device.
    return torch.randn(p.shape, generator=generator, dtype=p.dtype, device="cpu").to(p.device)


def _skipped(param_name: str, modules: tuple[str, ...]) -> bool:
    return any(m == "" or param_name.startswith(m + ".") for m in modules)


def _has_module(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def _number(text: str, what: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValfreeError(f"{what} in the noise spec {spec!r} must be a number, not {text!r}; {SPEC_HELP}.") from None


def parse_noise(spec: "str | NoiseModel") -> NoiseModel:
    """A noise model from a short spec: ``iso:1e-3``, ``quant:8``, ``quant:4:channel``,
    ``sgd:lr=0.1,batch=128[,curvature=hessian][,loss=mse]``, ``label:0.1`` or ``prune:0.3``."""
    if isinstance(spec, NoiseModel):
        return spec
    if not isinstance(spec, str) or ":" not in spec:
        raise ValfreeError(f"unknown noise spec {spec!r}; {SPEC_HELP}.")
    kind, _, rest = spec.strip().partition(":")
    kind = kind.lower()
    if kind in ("iso", "isotropic"):
        return Isotropic(_number(rest, "sigma", spec))
    if kind in ("quant", "quantization"):
        bits_text, _, granularity = rest.partition(":")
        if not bits_text.strip().lstrip("-").isdigit():
            raise ValfreeError(f"the bits in the noise spec {spec!r} must be an integer, e.g. quant:8; {SPEC_HELP}.")
        return Quantization(int(bits_text), granularity or "tensor")
    if kind == "sgd":
        options = {}
        for part in filter(None, rest.split(",")):
            key, eq, value = part.partition("=")
            if not eq:
                raise ValfreeError(f"the SGD noise spec {spec!r} needs key=value pairs, e.g. sgd:lr=0.1,batch=128.")
            options[key.strip().lower()] = value.strip()
        unknown = set(options) - {"lr", "batch", "batch_size", "curvature", "loss"}
        if unknown or "lr" not in options or not ({"batch", "batch_size"} & set(options)):
            raise ValfreeError(f"the SGD noise spec {spec!r} needs lr= and batch= (optional curvature=, loss=), e.g. sgd:lr=0.1,batch=128.")
        batch = _number(options.get("batch", options.get("batch_size")), "batch", spec)
        if batch != int(batch):
            raise ValfreeError(f"the batch size in the noise spec {spec!r} must be an integer.")
        return SGDNoise(_number(options["lr"], "lr", spec), int(batch), options.get("curvature", "ggn"), options.get("loss", "ce"))
    if kind == "label":
        return LabelNoise(_number(rest, "sigma", spec))
    if kind in ("prune", "pruning"):
        return Pruning(amount=_number(rest, "the pruned fraction", spec))
    raise ValfreeError(f"unknown noise spec {spec!r}; {SPEC_HELP}.")
