"""The result of a TPV estimate, and how draws become a value with its standard errors."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from scipy import stats


@dataclass(frozen=True)
class EstimatorSettings:
    """How an estimator runs, as :func:`tpv` documents each: probes (None: the method's default), inputs
    per batched pass, per-sample engine, adaptive stopping (rtol, max_probes), the exact method's memory
    limit, and the method-specific options."""

    probes: int | None
    batch_size: int
    engine: str
    rtol: float | None
    max_probes: int
    max_exact_bytes: int
    options: dict


@dataclass
class TPVEstimate:
    """A TPV value with its uncertainty.

    ``value`` estimates TPV = E_x E_dw ||f_{w+dw}(x) - f_w(x)||^2 over the given inputs (first order:
    Tr(H_eff C) with H_eff the mean of J^T J over those inputs), summed over the outputs.

    Two standard errors, because there are two sources of randomness:

    - ``stderr``: from the random probes or draws alone, holding the inputs fixed. It shrinks as
      1/sqrt(probes) and is 0 for deterministic methods (exact, closed form, pruning's JVP). Use it to
      compare with an exact value on the same inputs.
    - ``input_stderr``: treating the inputs as a sample from their distribution as well (it includes
      the probe noise). Use it when the question is about the data distribution, e.g. train vs test.

    ``probes`` is the number of probes per input (trace) or of draws (Monte Carlo); ``seconds`` the wall
    time; ``per_input`` the mean value for each input (not part of :meth:`as_dict`).
    """

    value: float
    stderr: float
    input_stderr: float
    probes: int
    seconds: float
    method: str
    noise: str
    n_inputs: int
    outputs: str = "logits"
    engine: str = ""
    per_input: torch.Tensor | None = field(default=None, repr=False, compare=False)
    #: Mean over inputs for each draw, when one draw serves all inputs (Monte Carlo dw, SGD probes);
    #: two estimates made with the same seed share those draws, which :mod:`.stability` pairs.
    per_draw: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def rel_stderr(self) -> float:
        """stderr / |value| (inf when the value is 0)."""
        return self.stderr / abs(self.value) if self.value else math.inf

    def interval(self, level: float = 0.95, over_inputs: bool = False) -> tuple[float, float]:
        """A normal-approximation confidence interval for the value."""
        z = float(stats.norm.ppf(0.5 + level / 2))
        se = self.input_stderr if over_inputs else self.stderr
        return self.value - z * se, self.value + z * se

    def as_dict(self) -> dict:
        row = asdict(self)
        row.pop("per_input", None)
        row.pop("per_draw", None)
        return row

    def __str__(self) -> str:
        what = f"{self.probes} probes x {self.n_inputs} inputs" if self.probes else f"{self.n_inputs} inputs"
        return f"TPV {self.value:.4g} ± {self.stderr:.2g} ({self.method}, {self.noise}, {what}, {self.seconds:.2f} s)"


def summarise(draws: torch.Tensor, shared: bool) -> tuple[float, float, float, torch.Tensor]:
    """(value, stderr, input_stderr, per-input means) from a (draws R, inputs N) table of unbiased values.

    ``shared`` says whether one draw is used for all inputs (a Monte Carlo dw, a parameter-space probe)
    or each input has its own (per-sample Rademacher vectors). With shared draws the probe error is the
    spread of the per-draw means; with independent ones it is the within-input spread across draws,
    pooled. A single draw (R = 1) means a deterministic method: the probe error is 0.
    """
    draws = draws.detach().double().cpu()
    r, n = draws.shape
    value = float(draws.mean())
    per_input = draws.mean(0)
    between_inputs = float(per_input.var(unbiased=True)) / n if n > 1 else 0.0
    if r < 2:
        return value, 0.0, math.sqrt(between_inputs), per_input
    if shared:
        stderr = math.sqrt(float(draws.mean(1).var(unbiased=True)) / r)
        input_stderr = math.sqrt(stderr**2 + between_inputs)
    else:
        stderr = math.sqrt(float(draws.var(0, unbiased=True).sum()) / r) / n
        # per_input already averages the probes, so its spread includes their noise.
        input_stderr = math.sqrt(between_inputs)
    return value, stderr, input_stderr, per_input
