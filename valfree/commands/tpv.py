"""``valfree tpv``: TPV of every checkpoint in a folder, into a resumable CSV, a table and a plot.

Each checkpoint is loaded safely (:func:`valfree.io.load_into`), measured on a fixed, seeded batch of
training inputs and, with ``test_data``, on test inputs too (only their inputs are taken; labels are
never used). A checkpoint that fails is recorded as a failed row and the others still run; rows are
written as they finish, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from typing import TYPE_CHECKING

from ..errors import ValfreeError
from . import EXIT_PARTIAL_FAILURE
from .arguments import TPV_METHODS, TPV_OUTPUTS, add_device, add_out, add_quiet, at_least, nonnegative_int, positive_int
from .checkpoint_loop import RunSummary
from .preflight import check_device, check_output_file

if TYPE_CHECKING:  # torch, valfree.io and valfree.tpv load when the command runs, not when the CLI starts
    from ..io.checkpoints import CheckpointRef
    from ..io.results import ResultsStore

# A row's status when it was measured (valfree.io.results.STATUS_OK).
STATUS_OK = "ok"

# Columns that must agree for rows of one CSV to be comparable.
CONFIG_COLUMNS = ("noise", "method", "outputs", "data", "test_data", "n_inputs")


def add_parser(sub) -> None:
    p = sub.add_parser("tpv", help="test prediction variance of checkpoints under quantization, pruning, SGD or label noise",
                       description="Measure the test prediction variance (TPV) of every checkpoint under one noise "
                                   "model, from training inputs alone, into a resumable CSV, a table and a plot.")
    p.add_argument("checkpoints", nargs="+", help="a folder, a glob, or checkpoint files")
    p.add_argument("--model", action="append", default=[],
                   help="MODULE:FACTORY returning the nn.Module; repeat once per checkpoint to compare architectures")
    p.add_argument("--data", required=True, help="training data spec; only its inputs are used (labels only for sgd curvature=hessian)")
    p.add_argument("--test-data", default=None, help="data spec whose test split's inputs give the test TPV (labels never read)")
    p.add_argument("--noise", required=True,
                   help="quant:8 | quant:4:channel | quant:8:global | iso:1e-3 | sgd:lr=0.1,batch=128[,curvature=hessian] | label:0.1 | prune:0.3")
    p.add_argument("--method", default="trace", choices=TPV_METHODS, help="how TPV is estimated")
    p.add_argument("--probes", type=at_least(2), default=None,
                   help="probes per input (trace) or draws (monte_carlo), at least 2 (default: the method's own)")
    p.add_argument("--inputs", type=at_least(2), default=512, help="how many inputs to draw from each split")
    p.add_argument("--outputs", default="logits", choices=TPV_OUTPUTS, help="which outputs' variance is measured")
    p.add_argument("--skip", action="append", default=[],
                   help="module kept in full precision under quantization ('head' = the classifier); repeatable")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the inputs and the probes")
    p.add_argument("--batch-size", type=positive_int, default=256, help="inputs per forward pass")
    add_device(p)
    add_out(p, "tpv.csv", "results CSV, one row per checkpoint; rerunning skips those done")
    p.add_argument("--plot", default=None, help="PNG file to draw (default: next to --out when --test-data is given)")
    p.add_argument("--rank", action="store_true", help="list checkpoints from lowest to highest TPV instead of by step")
    add_quiet(p)
    p.set_defaults(func=run)


def run(args) -> int:
    check_device(args.device)
    check_output_file(args.out, "--out", "tpv.csv")
    if args.plot is not None:
        check_output_file(args.plot, "--plot", "tpv.png")
    result = run_tpv(
        args.checkpoints, args.model, args.data, args.noise, test_data=args.test_data, method=args.method,
        probes=args.probes, inputs=args.inputs, seed=args.seed, outputs=args.outputs, out=args.out, plot=args.plot,
        device=args.device, skip=tuple(args.skip), batch_size=args.batch_size, progress=not args.quiet,
    )
    print(result.describe(rank=args.rank))
    return EXIT_PARTIAL_FAILURE if result.failed else 0


@dataclass
class TPVRun(RunSummary):
    """What a ``valfree tpv`` run did (the counts and failures every run over checkpoints reports), the
    rows of its checkpoints, the plot, and the text it prints."""

    verb: str = "measured"
    rows: list[dict] = field(default_factory=list)
    plot: str | None = None

    def describe(self, rank: bool = False) -> str:
        return tpv_table(self.rows, rank) + "\n" + self._footer()

    def _footer(self) -> str:
        lines = []
        if self.note:
            lines.append(f"note: {self.note}")
        from ..tpv.ranking import peak

        ok = [r for r in self.rows if r.get("status") == STATUS_OK]
        if len(ok) >= 3:
            steps = [int(r["step"]) for r in ok]
            i, step, interior = peak(steps, [float(r["tpv"]) for r in ok])
            where = ("an interior peak: the run turns from fitting to the double-descent phase there" if interior
                     else "at an end of the run, so no interior peak")
            lines.append(f"argmax-TPV checkpoint: step {step}, {where}")
        lines += [self.counts()] + self.failure_lines()
        if self.plot:
            lines.append(f"plot: {self.plot}")
        return "\n".join(lines)


def _fmt(value, stderr) -> str:
    try:
        return f"{float(value):.4g} ± {float(stderr):.2g}"
    except (TypeError, ValueError):
        return "-"


def tpv_table(rows: list[dict], rank: bool = False) -> str:
    """A plain-text table: step, checkpoint, TPV ± stderr (and test TPV, ratio, verdict when measured)."""
    ok = [r for r in rows if r.get("status") == STATUS_OK]
    if rank:
        ok = sorted(ok, key=lambda r: float(r["tpv"]))
    with_test = any(r.get("test_tpv") not in (None, "") for r in ok)
    header = ["rank" if rank else "step", "checkpoint", "train TPV ± stderr"]
    if with_test:
        header += ["test TPV ± stderr", "train/test [95% CI]", "verdict"]
    table = [header]
    for i, r in enumerate(ok):
        line = [str(i + 1) if rank else str(r["step"]), Path(str(r["path"])).name, _fmt(r["tpv"], r["tpv_stderr"])]
        if with_test:
            line += [
                _fmt(r.get("test_tpv"), r.get("test_tpv_stderr")),
                f"{float(r['ratio']):.3g} [{float(r['ratio_low']):.3g}, {float(r['ratio_high']):.3g}]",
                str(r.get("verdict", "")),
            ]
        table.append(line)
    widths = [max(len(row[c]) for row in table) for c in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def _check_config(store: ResultsStore, config: dict) -> None:
    for row in store.rows():
        for key in CONFIG_COLUMNS:
            if key in row and str(row[key]) != str(config[key]):
                raise ValfreeError(
                    f"{store.path} holds TPV results with {key}={row[key]!r}, not {config[key]!r}; "
                    "pass another --out or remove the file to start over."
                )


def write_plot(rows: list[dict], path: str | os.PathLike) -> str:
    """Train against test TPV, or TPV along the run when no test was given.

    Each point is labelled with its step. The error bars are two standard errors that count the inputs
    as a sample too (``tpv_input_stderr``), which is what a comparison of two input sets needs; the
    legend says so. Against test TPV, the band where the training inputs stand in for the test inputs
    (the stability verdict's ratio band around y = x) is shaded.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..tpv.stability import STABLE_BAND

    ok = [r for r in rows if r.get("status") == STATUS_OK]
    steps = [r.get("step") for r in ok]
    fig, ax = plt.subplots(figsize=(5.6, 4.6))
    bars = "error bars: ±2 standard errors (over inputs and probes)"
    if ok and ok[0].get("test_tpv") not in (None, ""):
        tr = [float(r["tpv"]) for r in ok]
        te = [float(r["test_tpv"]) for r in ok]
        ax.errorbar(tr, te, xerr=[2 * float(r["tpv_input_stderr"]) for r in ok],
                    yerr=[2 * float(r["test_tpv_input_stderr"]) for r in ok], fmt="o", ms=4, capsize=2,
                    label="checkpoint; " + bars)
        finite = [v for v in tr + te if math.isfinite(v)]
        lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
        log = lo > 0 and hi / lo > 20
        pad = (hi / lo) ** 0.05 if log else 0.05 * (hi - lo or abs(hi) or 1.0)
        a, b = (lo / pad, hi * pad) if log else (lo - pad, hi + pad)
        if log:
            import numpy as np

            line = np.geomspace(a, b, 50)
        else:
            line = [a + (b - a) * i / 49 for i in range(50)]
        ax.fill_between(line, [v / STABLE_BAND for v in line], [v * STABLE_BAND for v in line], color="C2",
                        alpha=0.15, lw=0, label=f"stable band: train/test within [{1 / STABLE_BAND:.2f}, {STABLE_BAND:.2f}]")
        ax.plot(line, line, "k--", lw=1, label="train = test")
        _label_steps(ax, tr, te, steps)
        ax.set_xlabel("training-set TPV")
        ax.set_ylabel("test-set TPV")
        if log:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.set_xlim(a, b)
        ax.set_ylim(a, b)
    else:
        xs = [int(s) for s in steps]
        ys = [float(r["tpv"]) for r in ok]
        ax.errorbar(xs, ys, yerr=[2 * float(r["tpv_input_stderr"] if r.get("tpv_input_stderr") not in (None, "")
                                            else r["tpv_stderr"]) for r in ok],
                    fmt="o-", ms=4, capsize=2, label="checkpoint; " + bars)
        _label_steps(ax, xs, ys, steps)
        ax.set_xlabel("step")
        ax.set_ylabel("training-set TPV")
    if ok:
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=1, frameon=False)
    ax.set_title(f"TPV, {ok[0]['noise'] if ok else ''}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def _label_steps(ax, xs, ys, steps, most: int = 30) -> None:
    """Write each point's step next to it (every k-th one on a long run, so that labels stay legible)."""
    every = max(1, math.ceil(len(xs) / most))
    for i, (x, y, step) in enumerate(zip(xs, ys, steps)):
        if i % every == 0 or i == len(xs) - 1:
            ax.annotate(f"{step}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7, color="0.3")


def run_tpv(
    sources, model_specs: list[str], data_spec: str, noise_spec: str, *, test_data: str | None = None,
    method: str = "trace", probes: int | None = None, inputs: int = 512, seed: int = 0, outputs: str = "logits",
    out: str | os.PathLike = "tpv.csv", plot: str | None = None, device: str = "cpu", skip: tuple[str, ...] = (),
    batch_size: int = 256, progress: bool = True,
) -> TPVRun:
    """Measure TPV for every checkpoint in ``sources``; see the module docstring."""
    from ..batches import batch_size_of
    from ..io.checkpoints import discover_checkpoints, load_into
    from ..io.data import inputs_only, load_dataset, probe_batch
    from ..io.factory import build_model
    from ..io.results import ResultsStore, checkpoint_key
    from ..tpv import METHODS, Quantization, SGDNoise, parse_noise
    from .checkpoint_loop import CheckpointLoop

    noise = parse_noise(noise_spec)
    # Options that would fail on every checkpoint are refused once, up front.
    if method not in METHODS:
        raise ValfreeError(f"unknown TPV method {method!r}; choose one of {', '.join(METHODS)}.")
    if probes is not None and probes < 2:
        raise ValfreeError(f"--probes must be at least 2 (the spread between probes gives the standard error), not {probes}.")
    if inputs < 2:
        raise ValfreeError(f"--inputs must be at least 2, not {inputs}.")
    if skip:
        if not isinstance(noise, Quantization):
            raise ValfreeError("--skip keeps modules in full precision and applies to quantization noise (quant:BITS) only.")
        noise = replace(noise, skip=tuple(skip))
    refs, note = discover_checkpoints(sources)
    if not model_specs:
        raise ValfreeError("--model MODULE:FACTORY is needed to rebuild the network each checkpoint belongs to.")
    if len(model_specs) not in (1, len(refs)):
        raise ValfreeError(f"give one --model for all checkpoints or one per checkpoint; got {len(model_specs)} for {len(refs)} checkpoints.")
    specs = model_specs * len(refs) if len(model_specs) == 1 else list(model_specs)
    train = load_dataset(data_spec, "train")
    x_train = inputs_only(train, inputs, seed)
    if isinstance(noise, SGDNoise) and noise.curvature == "hessian":
        _, y = probe_batch(train, inputs, seed)
        if (y < 0).any():
            raise ValfreeError(f"SGD noise with curvature=hessian needs labels, and {data_spec} has none; use curvature=ggn.")
        noise = noise.bind(x_train, y)
    x_test = inputs_only(load_dataset(test_data, "test"), inputs, seed) if test_data else None
    config = {"noise": noise.spec(), "method": method, "outputs": outputs, "data": data_spec,
              "test_data": test_data or "", "n_inputs": batch_size_of(x_train)}
    store = ResultsStore(out)
    _check_config(store, config)
    run = TPVRun(out=str(out), note=note)
    spec_of = {ref.path: spec for ref, spec in zip(refs, specs)}

    estimator = dict(probes=probes, seed=seed, outputs=outputs, batch_size=batch_size)

    def measure(ref: CheckpointRef) -> dict:
        model = load_into(build_model(spec_of[ref.path]), ref.path).to(device)
        return _tpv_columns(model, x_train, x_test, noise, method, estimator)

    CheckpointLoop(refs, store, run).run(measure, columns=lambda ref: {"model": spec_of[ref.path], **config},
                                         desc="tpv", progress=progress)
    keys = {checkpoint_key(r.path)[0] for r in refs}
    run.rows = [r for r in store.rows() if r.get("path") in keys]
    run.rows.sort(key=lambda r: int(r["step"]))
    if plot or (x_test is not None and any(r.get("status") == STATUS_OK for r in run.rows)):
        run.plot = write_plot(run.rows, plot or Path(out).with_suffix(".png"))
    return run


def _tpv_columns(model, x_train, x_test, noise, method: str, estimator: dict) -> dict:
    """The TPV columns of one model: on the training inputs, and with test inputs the stability columns."""
    from ..tpv import tpv, tpv_stability

    if x_test is None:
        return _estimate_columns(tpv(model, x_train, noise, method, **estimator), "")
    result = tpv_stability(model, x_train, x_test, noise, method, **estimator)
    row = _estimate_columns(result.train, "")
    row.update(_estimate_columns(result.test, "test_"))
    row.update(ratio=result.ratio, ratio_low=result.ratio_low, ratio_high=result.ratio_high, verdict=result.verdict)
    return row


def _estimate_columns(est, prefix: str) -> dict:
    cols = {f"{prefix}tpv": est.value, f"{prefix}tpv_stderr": est.stderr, f"{prefix}tpv_input_stderr": est.input_stderr}
    if not prefix:
        cols.update(probes=est.probes, seconds=round(est.seconds, 4), estimator=est.method)
    else:
        cols[f"{prefix}seconds"] = round(est.seconds, 4)
    return {k: (v if not (isinstance(v, float) and math.isnan(v)) else "nan") for k, v in cols.items()}
