"""Summaries of the other benchmarks' JSON (probe speed, integration overhead, TPV speed and stability)
and of the evidence benchmark's own timings, for the Cost and TPV sections of the report.

The other benchmarks are owned elsewhere; their files may be absent or their layout may change, so
each reader says plainly when it found nothing it could read instead of failing the report.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _walk(obj, path=()):
    """Yield (key path, dict) for every dict nested in ``obj``."""
    if isinstance(obj, dict):
        yield path, obj
        for k, v in obj.items():
            yield from _walk(v, path + (str(k),))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _walk(v, path + (str(i),))


def stability_points(results_dir: Path) -> tuple[list[tuple[float, float, str]], str]:
    """(train TPV, test TPV, label) pairs from the TPV benchmark's stability results, if present."""
    pts = []
    used = []
    for path in sorted(results_dir.glob("tpv_stability*.json")):
        data = _load(path)
        if data is None:
            continue
        for keys, d in _walk(data):
            train = d.get("train_tpv", d.get("train"))
            test = d.get("test_tpv", d.get("test"))
            if isinstance(train, dict):
                train = train.get("value")
            if isinstance(test, dict):
                test = test.get("value")
            if isinstance(train, (int, float)) and isinstance(test, (int, float)) and train > 0 and test > 0:
                if "width" in d:
                    label = f"MLP widths, {d.get('noise', '')}".rstrip(", ")
                else:
                    label = str(d.get("task", d.get("model", path.stem)))
                pts.append((float(train), float(test), f"{path.stem}: {label}"))
        used.append(path.name)
    if not used:
        return [], "The TPV benchmark's `tpv_stability*.json` was not found, so only this benchmark's sweep is shown."
    labels = sorted({p[2].split(": ", 1)[-1] for p in pts})
    return pts, f"Includes {len(pts)} points from {', '.join(f'`benchmarks/results/{u}`' for u in used)} ({'; '.join(labels)})."


def _signal_costs(r: dict, key: str = "signal_seconds_per_checkpoint") -> list[list[str]]:
    """Median ms per checkpoint and family: wall clock (``signal_seconds_per_checkpoint``) or CPU time."""
    by = defaultdict(lambda: defaultdict(list))
    for m in r["run_meta"]:
        fam = m["name"].split("-")[0]
        for g, s in m.get(key, {}).items():
            if s == s:  # not NaN
                by[g][fam].append(1000 * s)
        steps = m["total_steps"]
        if key == "signal_seconds_per_checkpoint":
            by["training step"][fam].append(1000 * m["train_seconds"] / max(steps, 1))
        elif m.get("cpu_seconds", float("nan")) == m.get("cpu_seconds", float("nan")):
            # CPU time of the loop per checkpoint interval: the training steps plus the evaluation passes.
            by["train + evaluate, per checkpoint"][fam].append(1000 * m["cpu_seconds"] / max(m.get("checkpoints", 30), 1))
    fams = list(r["sizes"]["families"])
    names = {"probe": "probe (256 train images)", "pseudo": "pseudo-label probe (256 held-out)",
             "tpv": "Tr(H_eff) (64 inputs x 4 probes)", "ww": "WeightWatcher alpha", "training step": "one training step (batch 128)",
             "train + evaluate, per checkpoint": "training + evaluation between two checkpoints"}
    return [[names.get(g, g)] + [f"{np.median(by[g][fam]):.1f}" if by[g].get(fam) else "n/a" for fam in fams] for g in names if g in by]


def cost_section(r: dict, results_dir: Path) -> str:
    from .report import table

    fams = list(r["sizes"]["families"])
    out = ["Median milliseconds per checkpoint in the evidence runs, one torch thread. **Wall clock** first: the machine "
           "also ran other jobs (up to two evidence runs at a time, plus tests; some runs were trained under a load average "
           "of 10 to 15 on the 2 cores), so these are inflated and vary between rows; use them only as an upper bound. The controlled timings are the dedicated benchmarks below.",
           table(["signal (wall ms)"] + fams, _signal_costs(r))]
    cpu_rows = _signal_costs(r, "signal_cpu_seconds_per_checkpoint")
    if cpu_rows:
        out += ["**CPU time** per checkpoint (process time, far less sensitive to the load; recorded only by runs "
                "started after it was added, n/a elsewhere):", table(["signal (CPU ms)"] + fams, cpu_rows)]
    perf = _load(results_dir / "evidence_perf.json") if r["grid"] == "full" else _load(results_dir / "evidence_perf_quick.json")
    if perf:
        out.append(
            f"**Scoring a folder of checkpoints** (`{perf['command']}`; {perf['family']}, folder `{perf['folder']}`, "
            f"{perf['rounds'][0]['checkpoints']} checkpoints, {len(perf['rounds'])} interleaved rounds, same process): the probe "
            f"({perf['probe']}) scores {perf['median_probe_ckpt_per_s']:.2f} checkpoints/s; a full validation pass "
            f"({perf['validation']}) manages {perf['median_validation_ckpt_per_s']:.2f} checkpoints/s. The probe is "
            f"**{perf['median_ratio']:.1f}x** faster (median of per-round ratios; both include loading each checkpoint).")
    else:
        out.append("The folder-scoring measurement (`python -m benchmarks.evidence perf`) has not been run for this grid.")
    ps = _load(results_dir / "probe_speed.json")
    if ps and "probe_vs_epoch" in ps:
        pe = ps["probe_vs_epoch"]
        cf = ps.get("closed_form_vs_autograd", [])
        sp = ", ".join(f"B={c['B']} d={c['d']} C={c['C']}: {c['speedup']:.1f}x" for c in cf)
        out.append(f"**Probe vs epoch and closed form vs autograd** (from `benchmarks/results/probe_speed.json`, "
                   f"[docs/probe_speed.md](probe_speed.md)): one fixed-batch probe of {pe['probe_batch']} images = "
                   f"{100 * pe['probe_fraction_of_epoch']:.2f} % of a {pe['steps_per_epoch']}-step epoch. Closed form over autograd: {sp}.")
    io = _load(results_dir / "integration_overhead.json")
    io_text = _integration(io) if io else None
    if io_text:
        out.append(io_text)
    ts = _load(results_dir / "tpv_speed.json")
    if ts and isinstance(ts.get("results"), list):
        rows = []
        for res in ts["results"]:
            for row in res.get("rows", []):
                if "time_to_5pct" in row:
                    rows.append([res.get("model", "?"), row["method"], f"{row['time_to_5pct']:.3g}", f"{row.get('speedup_vs_a', float('nan')):.3g}x"])
        out += [f"**TPV estimators at equal stderr** (from `benchmarks/results/tpv_speed.json`, `{ts.get('meta', {}).get('command', '')}`): "
                "seconds to reach a 5 % relative standard error, and speed-up over the per-(sample, probe) loop.",
                table(["model", "method", "seconds to 5 % stderr", "speed-up"], rows)]
    skip = {"integration_overhead.json"} if io_text else set()
    if ts and isinstance(ts.get("results"), list):
        skip.add("tpv_speed.json")
    for name, what in (("integration_overhead.json", "Monitor overhead (fixed-batch and piggyback)"), ("tpv_speed.json", "TPV estimators at equal stderr")):
        if name in skip:
            continue
        data = _load(results_dir / name)
        if data is None:
            out.append(f"{what}: `benchmarks/results/{name}` not found when this report was generated.")
        else:
            out.append(f"{what}: see `benchmarks/results/{name}`" + _brief(data))
    return "\n\n".join(out)


def _first(d: dict, *keys):
    for k in keys:
        if isinstance(d, dict) and isinstance(d.get(k), (int, float)):
            return float(d[k])
    return None


def _integration(io: dict) -> str | None:
    """The Monitor's overhead from integration_overhead.json (its layout has CPU and wall variants)."""
    pig, fixed = io.get("piggyback", {}), io.get("fixed_batch", {})
    pig_pct = _first(pig, "percent_of_step_cpu", "percent_of_step")
    step = _first(io, "step_ms_cpu", "step_ms")
    if pig_pct is None:
        return None
    parts = [f"piggyback: {pig_pct:.2f} % of a {step:.0f} ms training step" if step else f"piggyback: {pig_pct:.2f} % of a step"]
    by = fixed.get("by_probe_batch")
    if isinstance(by, dict):
        for b, d in by.items():
            pct = _first(d, "percent_of_epoch_cpu", "percent_of_epoch")
            if pct is not None:
                parts.append(f"fixed batch of {b}: {pct:.3f} % of an epoch (one probe every {io.get('setup', {}).get('fixed_every', '?')} steps)")
    else:
        pct = _first(fixed, "percent_of_epoch_cpu", "percent_of_epoch")
        if pct is not None:
            parts.append(f"fixed batch: {pct:.3f} % of an epoch")
    return (f"**Monitor overhead** (from `benchmarks/results/integration_overhead.json`, `{io.get('command', '')}`, "
            f"CPU time where recorded): " + "; ".join(parts) + ".")


def _brief(data) -> str:
    """A one-line digest of the numeric leaves whose names mention percent, overhead, ratio or speed-up."""
    keep = []
    for keys, d in _walk(data):
        for k, v in d.items():
            if isinstance(v, (int, float)) and any(w in k.lower() for w in ("pct", "percent", "overhead", "ratio", "speedup")):
                label = "/".join(x for x in keys[-2:] if not x.isdigit()) or ""
                keep.append(f"{label + ' ' if label else ''}{k}={v:.3g}")
    return (": " + "; ".join(keep[:12]) + ("; ..." if len(keep) > 12 else "") + ".") if keep else "."
