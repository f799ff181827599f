"""The evidence pipeline end to end on a seconds-sized digits grid, and its assertions on broken input."""

from __future__ import annotations

import contextlib
import json
import math

import numpy as np
import pytest

pytest.importorskip("sklearn")

from benchmarks.evidence import checks, report  # noqa: E402
from benchmarks.evidence.config import tiny_grid  # noqa: E402
from benchmarks.evidence.metrics import evaluate_runs  # noqa: E402
from benchmarks.evidence.results import build_results  # noqa: E402
from benchmarks.evidence.runner import run_grid  # noqa: E402
from benchmarks.evidence.selectors import Run, Selector, all_selectors  # noqa: E402


@contextlib.contextmanager
def without_weightwatcher():
    """WeightWatcher is an optional extra and slow to import; its group is covered when installed."""
    from benchmarks.evidence import signals

    saved = signals.GROUPS
    signals.GROUPS = {k: v for k, v in saved.items() if k != "ww"}
    try:
        yield
    finally:
        signals.GROUPS = saved


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("evidence_cache")
    specs = tiny_grid()
    with without_weightwatcher():
        assert run_grid(specs, cache, workers=1, log=lambda *a, **k: None) == []
        results = build_results("tiny", specs, "pytest", cache)
    return specs, cache, results


def test_pipeline_produces_finite_headline_numbers(tiny, tmp_path):
    specs, cache, results = tiny
    assert results["runs_finished"] == len(specs)
    overall = {row["selector"]: row for row in results["summary"]["overall"]}
    for name in ("hg_raw", "hg_raw_family", "pseudo_heldout", "tpv", "hg_tpv_guard", "last", "val100"):
        assert math.isfinite(overall[name]["gap_mean"]), name
    assert all(v["chosen"]["oracle"]["gap"] == 0 for v in results["per_run"].values())
    assert math.isfinite(results["correlations"]["hg_grad_norm|all|all"]["spearman_mean"])
    # The probe-batch-size study: every subset size below the probe batch, and the whole batch, whose
    # mean correlation must be the correlation table's.
    sizes = results["probe_size"]["sizes"]
    assert sizes == [16, 32, specs[0].probe_size]
    whole = results["probe_size"]["cells"][f"all|{specs[0].probe_size}"]
    assert whole["pearson_mean"] == pytest.approx(results["correlations"]["hg_grad_norm|all|all"]["pearson_mean"])
    assert all(math.isfinite(results["probe_size"]["cells"][f"all|{n}"]["gap_mean"]) for n in sizes)
    # The JSON round-trips and renders to markdown with plots.
    results = json.loads(json.dumps(results))
    text = report.render(results, None, tmp_path / "img", "tiny")
    assert "## Gap to the oracle" in text and "n/a" in text or "±" in text
    assert "## Probe batch size" in text and "| 16 |" in text
    assert (tmp_path / "img" / "evidence_gaps.png").exists()


def test_rerun_reuses_the_cache(tiny):
    specs, cache, _ = tiny
    traj = cache / specs[0].name / "trajectory.json"
    before = traj.stat().st_mtime_ns
    assert run_grid(specs[:1], cache, workers=1, log=lambda *a, **k: None) == []
    assert traj.stat().st_mtime_ns == before


def _runs(tiny):
    from benchmarks.evidence.results import collect

    specs, cache, _ = tiny
    return collect(specs, cache)[0]


def test_constant_selector_is_caught():
    broken = Selector("broken", "always the first checkpoint", "label-free", lambda run, runs: 0, "hg_grad_norm")
    with pytest.raises(checks.EvidenceError, match="ignores its input"):
        checks.check_selector_responds(broken)
    for sel in all_selectors():
        checks.check_selector_responds(sel)  # every real selector responds


def test_empty_or_constant_trajectory_is_caught(tiny):
    runs = _runs(tiny)
    empty = Run("empty", "mlp", "clean", 0, [])
    with pytest.raises(checks.EvidenceError, match="empty"):
        evaluate_runs([empty], all_selectors((50, 100)))
    flat = Run("flat", "mlp", "clean", 0, [dict(r, test_acc=0.5) for r in runs[0].rows])
    with pytest.raises(checks.EvidenceError, match="constant"):
        checks.check_trajectory(flat)


def test_nan_or_constant_signal_is_caught(tiny):
    run = _runs(tiny)[0]
    nan_rows = [dict(r, hg_grad_norm=float("nan")) if i == 2 else r for i, r in enumerate(run.rows)]
    with pytest.raises(checks.EvidenceError, match="non-finite"):
        checks.check_signal(Run(run.name, run.family, run.regime, run.seed, nan_rows), "hg_grad_norm")
    const_rows = [dict(r, hg_grad_norm=1.0) for r in run.rows]
    with pytest.raises(checks.EvidenceError, match="constant"):
        checks.check_signal(Run(run.name, run.family, run.regime, run.seed, const_rows), "hg_grad_norm")
    with pytest.raises(checks.EvidenceError, match="NaN"):
        checks.check_correlation(run, "hg_grad_norm", float("nan"))


def test_leave_one_seed_out_never_reads_the_evaluated_run(tiny):
    """Changing the held-out run's test accuracy must not change its per-family preset choice."""
    runs = _runs(tiny)
    sel = next(s for s in all_selectors() if s.name == "hg_raw_family")
    target = runs[0]
    before = sel.choose(target, runs)
    scrambled_rows = [dict(r, test_acc=float(a)) for r, a in zip(target.rows, np.random.default_rng(0).permutation(target.test_acc()))]
    scrambled = Run(target.name, target.family, target.regime, target.seed, scrambled_rows)
    swapped = [scrambled if r is target else r for r in runs]
    assert sel.choose(scrambled, swapped) == before


def test_full_test_pass_equals_evaluating_the_whole_split(tmp_path):
    """Training records the first `test_size` test images; the full-test pass adds the rest from the
    cached checkpoints. Its combined accuracy must equal one evaluation on the whole split."""
    from dataclasses import replace

    import torch

    from benchmarks.evidence.data import split_tensors
    from benchmarks.evidence.full_test import load_full_test
    from benchmarks.evidence.trajectories import evaluate, load_trajectory, run_dir
    from valfree.io.checkpoints import load_into

    spec = replace(tiny_grid()[0], test_size=100)
    with without_weightwatcher():
        assert run_grid([spec], tmp_path, workers=1, log=lambda *a, **k: None) == []
    traj, full = load_trajectory(spec, tmp_path), load_full_test(spec, tmp_path)
    x, y = split_tensors(spec.data, "test")
    assert traj["test_images"] == 100 and full["test_images"] == len(x) > 100
    model = spec.family.build(x.shape[-1])
    for ck, row in list(zip(traj["checkpoints"], full["rows"]))[::3]:
        load_into(model, run_dir(spec, tmp_path) / ck["path"])
        with torch.no_grad():
            acc, loss = evaluate(model, x, y)
        assert row["test_acc_full"] == pytest.approx(acc, abs=1e-12)
        assert row["test_loss_full"] == pytest.approx(loss, rel=1e-6)


def test_predictions_are_recorded_per_checkpoint(tiny):
    """predictions.npz: plain int arrays, one row per checkpoint, on a seeded training subset that holds
    the probe batch; the given labels are the (noisy) training labels, and the rows equal a direct
    eval-mode argmax of the saved checkpoints."""
    import torch

    from benchmarks.evidence.data import run_data
    from benchmarks.evidence.trajectories import load_trajectory, run_dir
    from valfree.io.checkpoints import load_into

    specs, cache, _ = tiny
    for spec in specs:
        traj = load_trajectory(spec, cache)
        with np.load(run_dir(spec, cache) / "predictions.npz", allow_pickle=False) as z:
            p = {k: z[k] for k in z.files}
        data = run_data(spec)
        n_train = len(data.x_train)
        S = min(spec.pred_subset, n_train)
        assert p["pred"].dtype == np.int16 and p["pred"].shape == (len(traj["checkpoints"]), S)
        assert p["steps"].tolist() == [ck["step"] for ck in traj["checkpoints"]]
        assert len(np.unique(p["index"])) == S and set(data.probe_index.tolist()) <= set(p["index"].tolist())
        assert np.array_equal(p["given"], data.y_train[p["index"]].numpy())
        assert np.array_equal(p["true"], data.y_train_clean[p["index"]].numpy())
        wrong = p["given"] != p["true"]
        if spec.regime.label_noise:
            assert 0.15 < wrong.mean() < 0.45
            if spec.regime.noise_type == "asymmetric":
                assert np.array_equal(p["given"][wrong], (p["true"][wrong] + 1) % 10)
        else:
            assert not wrong.any()
        assert traj["pred_subset"] == S and traj["pred_cpu_seconds"] > 0
        model = spec.family.build(data.in_size)
        for t in (0, len(p["steps"]) - 1):
            load_into(model, run_dir(spec, cache) / traj["checkpoints"][t]["path"])
            model.eval()
            with torch.no_grad():
                direct = model(data.x_train[torch.from_numpy(p["index"])]).argmax(1).numpy()
            assert np.array_equal(p["pred"][t], direct)
    # The subset is drawn apart from the training order: the same for any pred_subset >= n_train.
    assert specs[-2].pred_subset == 256 and len(np.load(run_dir(specs[-2], cache) / "predictions.npz")["index"]) == 256


def test_memorisation_section(tiny, tmp_path):
    """Every valfree rule is a selector; the memorisation results and section render from the JSON."""
    from benchmarks.evidence.selectors import RULES

    specs, cache, results = tiny
    overall = {row["selector"] for row in results["summary"]["overall"]}
    assert {f"rule:{r}" for r in RULES} <= overall
    mem = json.loads(json.dumps(results["memorisation"]))
    assert set(mem["details"]) == {s.name for s in specs}
    for name, rules in mem["details"].items():
        assert set(rules) == set(RULES)
        assert all(math.isfinite(d["gap"]) for d in rules.values())
        assert results["curves"][name]["pred_change"][0] != results["curves"][name]["pred_change"][0]  # PC_0 is NaN
    sizes = {s["size"]: s for s in mem["subset_size"]["sizes"]}
    assert sizes[512]["runs"] == len(specs) - 1  # the 256-image subset is too small for n=512
    text = report.render(json.loads(json.dumps(results)), None, tmp_path / "img", "tiny")
    assert "## Memorisation" in text and "### PC's standard error" in text
    assert (tmp_path / "img" / "evidence_prediction_changes.png").exists()


def test_a_run_gone_from_the_cache_is_rebuilt_from_the_committed_results(tiny, tmp_path):
    """carried.py: the JSON's curves rebuild a run whose cache is gone, and every choice it reported
    (recomputed or carried) comes out the same."""
    import shutil

    specs, cache, results = tiny
    previous = json.loads(json.dumps(results))
    partial = tmp_path / "cache"
    shutil.copytree(cache, partial)
    gone = specs[0].name
    shutil.rmtree(partial / gone)
    with without_weightwatcher():
        rebuilt = json.loads(json.dumps(build_results("tiny", specs, "pytest", partial, previous=previous)))
    assert rebuilt["runs_carried"] == [gone] and rebuilt["runs_missing"] == []
    for sel, choice in previous["per_run"][gone]["chosen"].items():
        assert rebuilt["per_run"][gone]["chosen"][sel]["index"] == choice["index"], sel
    assert rebuilt["memorisation"]["details"][gone] == previous["memorisation"]["details"][gone]
    cand = rebuilt["memorisation"]["candidates"]
    assert set(cand["per_run"]) == {s.name for s in specs}
    assert cand["decision"]["chosen"] in cand["candidates"] or cand["decision"]["chosen"] is None
    # without the committed results the run is missing, not invented
    with without_weightwatcher():
        alone = build_results("tiny", specs, "pytest", partial)
    assert alone["runs_missing"] == [gone]
