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

from ..batches import batch_size_of
from ..errors import ValfreeError
from ..io.checkpoints import CheckpointRef, discover_checkpoints, load_into
from ..io.data import inputs_only, load_dataset, probe_batch
from ..io.factory import build_model
from ..io.results import STATUS_OK, ResultsStore, checkpoint_key
from ..tpv import METHODS, Quantization, SGDNoise, parse_noise, tpv, tpv_stability
from ..tpv.estimators import OUTPUTS
from ..tpv.ranking import peak
from . import EXIT_PARTIAL_FAILURE
from .checkpoint_loop import CheckpointLoop, RunSummary

# Columns that must agree for rows of one CSV to be comparable.
CONFIG_COLUMNS = ("noise", "method", "outputs", "data", "test_data", "n_inputs")


def add_parser(sub) -> None:
    p = sub.add_parser("tpv", help="test prediction variance of checkpoints under quantization, pruning, SGD or label noise")
    p.add_argument("checkpoints", nargs="+", help="a folder, a glob, or checkpoint files")
    p.add_argument("--model", action="append", default=[],
                   help="MODULE:FACTORY returning the nn.Module; repeat once per checkpoint to compare architectures")
    p.add_argument("--data", required=True, help="training data spec; only its inputs are used (labels only for sgd curvature=hessian)")
    p.add_argument("--test-data", default=None, help="data spec whose test split's inputs give the test TPV (labels never read)")
    p.add_argument("--noise", required=True,
                   help="quant:8 | quant:4:channel | quant:8:global | iso:1e-3 | sgd:lr=0.1,batch=128[,curvature=hessian] | label:0.1 | prune:0.3")
    p.add_argument("--method", default="trace", choices=list(METHODS))
    p.add_argument("--probes", type=int, default=None, help="probes per input (trace) or draws (monte_carlo)")
    p.add_argument("--inputs", type=int, default=512, help="how many inputs to draw from each split")
    p.add_argument("--outputs", default="logits", choices=list(OUTPUTS))
    p.add_argument("--skip", action="append", default=[], help="module kept in full precision under quantization ('head' = the classifier)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="tpv.csv", help="results CSV, one row per checkpoint; rerunning skips those done")
    p.add_argument("--plot", default=None, help="PNG path (default with --test-data: next to --out)")
    p.add_argument("--rank", action="store_true", help="list checkpoints from lowest to highest TPV instead of by step")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
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
    """Train against test TPV with error bars and y = x, or TPV along the run when no test was given."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r.get("status") == STATUS_OK]
    fig, ax = plt.subplots(figsize=(5, 4.2))
    if ok and ok[0].get("test_tpv") not in (None, ""):
        tr = [float(r["tpv"]) for r in ok]
        te = [float(r["test_tpv"]) for r in ok]
        ax.errorbar(tr, te, xerr=[2 * float(r["tpv_input_stderr"]) for r in ok],
                    yerr=[2 * float(r["test_tpv_input_stderr"]) for r in ok], fmt="o", ms=4, capsize=2)
        lo, hi = min(tr + te), max(tr + te)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="train = test")
        ax.set_xlabel("training-set TPV")
        ax.set_ylabel("test-set TPV")
        if lo > 0 and hi / lo > 20:
            ax.set_xscale("log")
            ax.set_yscale("log")
        ax.legend()
    else:
        steps = [int(r["step"]) for r in ok]
        ax.errorbar(steps, [float(r["tpv"]) for r in ok], yerr=[2 * float(r["tpv_stderr"]) for r in ok], fmt="o-", ms=4, capsize=2)
        ax.set_xlabel("step")
        ax.set_ylabel("training-set TPV")
    ax.set_title(f"TPV, {ok[0]['noise'] if ok else ''}", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return str(path)


def run_tpv(
    sources, model_specs: list[str], data_spec: str, noise_spec: str, *, test_data: str | None = None,
    method: str = "trace", probes: int | None = None, inputs: int = 512, seed: int = 0, outputs: str = "logits",
    out: str | os.PathLike = "tpv.csv", plot: str | None = None, device: str = "cpu", skip: tuple[str, ...] = (),
    batch_size: int = 256, progress: bool = True,
) -> TPVRun:
    """Measure TPV for every checkpoint in ``sources``; see the module docstring."""
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
