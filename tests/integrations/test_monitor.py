"""valfree.Monitor in a plain loop: both modes train a small model, and every number is checked against
the core probe on the same weights and batch."""

from __future__ import annotations

import copy
import io
import math
from contextlib import redirect_stdout

import pytest
import torch
import torch.nn.functional as F

import valfree
from valfree.cli import main as cli_main
from valfree import head_gradient
from valfree.errors import ValfreeError
from valfree.io.checkpoints import load_into
from valfree.io.results import KEY_COLUMNS, PROBE_COLUMNS, ResultsStore
from valfree.models import cnn, mlp
from valfree.selection import ema, tail_window

FIELDS = ("grad_norm", "score_w", "score_z", "bias_grad_norm", "loss", "entropy", "confidence", "margin",
          "weight_norm", "feature_rms")


def blobs(n: int, seed: int, classes: int = 4, size: int = 8, noise: float = 1.5):
    """Noisy class templates as (n, 1, size, size) images: learnable in a few steps, not trivially."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.randn(classes, 1, size, size, generator=torch.Generator().manual_seed(99))
    y = torch.randint(0, classes, (n,), generator=g)
    x = templates[y] + noise * torch.randn(n, 1, size, size, generator=g)
    return x, y


def assert_same(got, want, rel=1e-5):
    for key in FIELDS:
        assert getattr(got, key) == pytest.approx(getattr(want, key), rel=rel, abs=1e-7), key
    assert got.batch_size == want.batch_size


POOL_STEPS = 40


def train(model, monitor, steps, seed=0, lr=0.2, probe_before_update=False, stop=False):
    torch.manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x_all, y_all = blobs(32 * POOL_STEPS, seed + 1)  # the same stream of batches whatever the run length
    done = 0
    for step in range(1, steps + 1):
        x, y = x_all[32 * (step - 1): 32 * step], y_all[32 * (step - 1): 32 * step]
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        if probe_before_update:
            monitor.step(step, targets=y)
        opt.step()
        opt.zero_grad()
        if not probe_before_update:
            monitor.step(step)
        done = step
        if stop and monitor.should_stop():
            break
    return done


def reference_kept(values, tail, span, k):
    """Independent statement of the retention rule: in the tail window and fewer than k better later points."""
    smoothed = ema(values, span)
    n = len(values)
    start, _ = tail_window(n, tail)
    return {i for i in range(start, n) if math.isfinite(smoothed[i])
            and sum(smoothed[j] < smoothed[i] for j in range(i + 1, n)) < k}


def test_fixed_batch_mode_scores_saves_and_selects_like_the_core(tmp_path):
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_size=8, width=32, depth=1)
    x_probe, y_probe = blobs(64, seed=7)
    results = tmp_path / "scores.csv"
    monitor = valfree.Monitor(model, probe_batch=(x_probe, y_probe), every=2, tail=0.5, ema=2, save_top_k=2,
                              checkpoint_dir=tmp_path / "ckpt", results=results)
    train(model, monitor, steps=16)
    steps, values = monitor.history
    assert steps == list(range(2, 17, 2))
    kept = reference_kept(values, 0.5, 2, 2)
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == sorted(f"step-{steps[i]}.pt" for i in kept)
    rows = ResultsStore(results).rows()
    assert list(rows[0])[: len(KEY_COLUMNS) + len(PROBE_COLUMNS)] == [*KEY_COLUMNS, *PROBE_COLUMNS]
    by_path = {r["path"]: r for r in rows}
    for path in (tmp_path / "ckpt").iterdir():
        # The recorded score is the core probe of the checkpoint that was saved.
        fresh = load_into(mlp(num_classes=4, in_size=8, width=32, depth=1), path)
        want = head_gradient(fresh, x_probe, y_probe)
        assert float(by_path[str(path.resolve())]["grad_norm"]) == pytest.approx(want.grad_norm, rel=1e-6)
    best = monitor.best()
    assert best.path and (tmp_path / "ckpt" / f"step-{best.step}.pt").exists()
    out = io.StringIO()
    with redirect_stdout(out):
        cli_main(["select", str(results), "--tail", "0.5", "--ema", "2"])
    assert out.getvalue().strip().splitlines()[-1] == str((tmp_path / "ckpt" / f"step-{best.step}.pt").resolve())


def test_piggyback_equals_the_train_mode_probe_of_the_same_batch():
    """BatchNorm model: piggyback sees batch statistics, i.e. head_gradient(..., train_mode=True)."""
    torch.manual_seed(0)
    model = cnn(num_classes=4, in_size=8, width=4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x_all, y_all = blobs(32 * 5, seed=3)
    with valfree.Monitor(model, piggyback=True, every=1) as monitor:
        for step in range(1, 6):
            x, y = x_all[32 * (step - 1): 32 * step], y_all[32 * (step - 1): 32 * step]
            want = head_gradient(copy.deepcopy(model), x, y, train_mode=True)
            F.cross_entropy(model(x), y).backward()
            got = monitor.step(step, targets=y)
            opt.step()
            opt.zero_grad()
            assert_same(got, want)
    assert not model.fc._forward_hooks  # closing the Monitor removed its hook


def test_piggyback_equals_fixed_batch_when_both_see_the_same_batch_in_the_same_mode():
    """Full-batch training of an MLP (no BatchNorm, no dropout: eval and train mode agree)."""
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_size=8, width=32, depth=2)
    x, y = blobs(48, seed=5)
    fixed = valfree.Monitor(model, probe_batch=(x, y), every=1)
    piggy = valfree.Monitor(model, piggyback=True, every=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    for step in range(1, 9):
        F.cross_entropy(model(x), y).backward()
        p = piggy.step(step, targets=y)
        f = fixed.step(step)
        opt.step()
        opt.zero_grad()
        assert_same(p, f)
    assert piggy.history[1] == pytest.approx(fixed.history[1], rel=1e-6)
    assert [v for v in piggy.history[1]] != [piggy.history[1][0]] * 8  # training moved the score


def reference_stop_step(steps, values, patience, min_delta, span):
    alpha = 2 / (span + 1)
    smoothed, best, wait = None, math.inf, 0
    for step, v in zip(steps, values):
        smoothed = v if smoothed is None else alpha * v + (1 - alpha) * smoothed
        if smoothed < best - min_delta:
            best, wait = smoothed, 0
        else:
            wait += 1
            if wait >= patience:
                return step
    return None


def test_early_stopping_stops_by_the_rule():
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_size=8, width=32, depth=1)
    x_probe, y_probe = blobs(64, seed=7)
    monitor = valfree.Monitor(model, probe_batch=(x_probe, y_probe), every=1, patience=3, min_delta=1e-3, ema=3)
    last = train(model, monitor, steps=40, lr=0.5, stop=True)
    steps, values = monitor.history
    assert last < 40, "this run should stop early"
    assert reference_stop_step(steps, values, 3, 1e-3, 3) == last


def test_resumed_monitor_continues_like_an_uninterrupted_one(tmp_path):
    def make(model, folder):
        return valfree.Monitor(model, probe_batch=blobs(64, seed=7), every=2, tail=0.5, save_top_k=2, patience=3,
                               checkpoint_dir=folder, results=folder / "scores.csv")

    torch.manual_seed(0)
    whole_model = mlp(num_classes=4, in_size=8, width=32, depth=1)
    start = copy.deepcopy(whole_model.state_dict())
    whole = make(whole_model, tmp_path / "whole")
    train(whole_model, whole, steps=8)
    # The same run in two parts, with the Monitor's state through torch.save(weights_only=True).
    part_model = mlp(num_classes=4, in_size=8, width=32, depth=1)
    part_model.load_state_dict(start)
    first = make(part_model, tmp_path / "part")
    train(part_model, first, steps=4)
    torch.save({"model": part_model.state_dict(), "monitor": first.state_dict()}, tmp_path / "resume.pt")
    saved = torch.load(tmp_path / "resume.pt", weights_only=True)
    resumed_model = mlp(num_classes=4, in_size=8, width=32, depth=1)
    resumed_model.load_state_dict(saved["model"])
    second = make(resumed_model, tmp_path / "part")
    second.load_state_dict(saved["monitor"])
    torch.manual_seed(0)
    opt = torch.optim.SGD(resumed_model.parameters(), lr=0.2)
    x_all, y_all = blobs(32 * POOL_STEPS, 1)
    for step in range(5, 9):
        F.cross_entropy(resumed_model(x_all[32 * (step - 1): 32 * step]), y_all[32 * (step - 1): 32 * step]).backward()
        opt.step()
        opt.zero_grad()
        second.step(step)
    assert second.history[0] == whole.history[0]
    assert second.history[1] == pytest.approx(whole.history[1], rel=1e-6)
    assert second.best().step == whole.best().step
    assert [p.rsplit("/", 1)[-1] for p in second.tracker.kept_paths] == [p.rsplit("/", 1)[-1] for p in whole.tracker.kept_paths]
    assert [r["step"] for r in ResultsStore(tmp_path / "part" / "scores.csv").rows()] == ["2", "4", "6", "8"]


def test_pseudo_labels_need_no_targets():
    torch.manual_seed(0)
    model = mlp(num_classes=4, in_size=8, width=16, depth=1)
    x, _ = blobs(32, seed=2)
    monitor = valfree.Monitor(model, probe_batch=(x, "pseudo"), every=1)
    assert monitor.step(1).grad_norm == pytest.approx(head_gradient(model, x, "pseudo").grad_norm)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"piggyback": True, "probe_batch": (torch.zeros(2, 1, 8, 8), torch.zeros(2))}, "not both"),
        ({"probe_batch": torch.zeros(2, 1, 8, 8)}, "probe_batch must be"),
        ({"probe_batch": {"x": torch.zeros(2)}}, "needs a 'labels' entry"),
        ({"piggyback": True, "every": 0}, "every must be"),
        ({"piggyback": True, "filename": "last.pt"}, "must contain"),
    ],
)
def test_bad_settings_are_one_clear_error(kwargs, message):
    with pytest.raises(ValfreeError, match=message):
        valfree.Monitor(mlp(num_classes=4, in_size=8, width=8, depth=1), **kwargs)


def test_piggyback_misuse_is_explained():
    model = mlp(num_classes=4, in_size=8, width=8, depth=1)
    monitor = valfree.Monitor(model, piggyback=True, every=1)
    with pytest.raises(ValfreeError, match="has not run since the last probe"):
        monitor.step(1, targets=torch.zeros(4, dtype=torch.long))
    model(torch.zeros(4, 1, 8, 8))
    with pytest.raises(ValfreeError, match="needs the step's targets"):
        monitor.step(2)


def test_valfree_and_the_monitor_do_not_import_the_frameworks():
    """Lightning and transformers are optional extras: only valfree.lightning / valfree.huggingface load them."""
    import subprocess
    import sys

    code = ("import sys, valfree; valfree.Monitor; import valfree.integrations; "
            "print(sorted(m for m in ('lightning', 'transformers', 'accelerate') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("every, batch, want", [(100, 128, 256), (469, 128, 1200), (1000, 128, 2048), (100, 16, 256)])
def test_the_default_prediction_subset_is_sized_from_the_training_between_checks(every, batch, want):
    x, y = blobs(4096, 0)
    monitor = valfree.Monitor(mlp(num_classes=4, in_size=8), every=every)
    for step in range(1, every + 1):
        start = (step - 1) * batch % len(x)
        monitor.step(step, batch=(x[start: start + batch], y[start: start + batch]))
    assert monitor.measurer.pred_subset == want
    assert len(monitor.measurer.tracker.inputs) == want and monitor.last_columns["pred_subset"] == want


def test_the_default_subset_waits_for_the_batch_size_before_drawing_from_a_dataset():
    from torch.utils.data import DataLoader, TensorDataset

    x, y = blobs(4096, 0)
    model = mlp(num_classes=4, in_size=8)
    # A DataLoader tells its batch size at once: 1000 steps of 64 inputs pay for 1280.
    loader = valfree.Monitor(model, every=1000, train_data=DataLoader(TensorDataset(x, y), batch_size=64))
    assert loader.measurer.pred_subset == 1280
    loader.step(1000)  # the draw is batched at the first check, once the model is known
    assert len(loader.measurer.tracker.inputs) == 1280
    # A Dataset does not: its draw waits for the first batch, then follows it.
    waits = valfree.Monitor(model, every=1000, train_data=TensorDataset(x, y))
    assert not waits.measurer.ready
    waits.step(1, batch=(x[:128], y[:128]))
    waits.step(1000)
    assert len(waits.measurer.tracker.inputs) == 2048
    # With nothing to tell, the draw at the first check takes the smallest default.
    blind = valfree.Monitor(model, every=2, train_data=TensorDataset(x, y))
    blind.step(1)
    blind.step(2)
    assert len(blind.measurer.tracker.inputs) == 256
    # A size that was asked for is kept.
    asked = valfree.Monitor(model, every=1000, pred_subset=512, train_data=TensorDataset(x, y))
    asked.step(1000)
    assert len(asked.measurer.tracker.inputs) == 512


@pytest.mark.parametrize("loader", [True, False])
def test_a_resumed_monitor_redraws_its_subset_from_train_data(loader):
    from torch.utils.data import DataLoader, TensorDataset

    x, y = blobs(600, 0)
    data = DataLoader(TensorDataset(x, y), batch_size=32) if loader else TensorDataset(x, y)
    model = mlp(num_classes=4, in_size=8)
    first = valfree.Monitor(model, every=2, train_data=data, seed=3)
    for step in (1, 2):
        first.step(step, batch=(x[:32], y[:32]))
    resumed = valfree.Monitor(model, every=2, train_data=data, seed=3)
    resumed.load_state_dict(first.state_dict())
    for monitor in (first, resumed):
        for step in (3, 4):
            monitor.step(step, batch=(x[:32], y[:32]))
    # The same rows, and their predictions at the last check: the series goes on as if never stopped.
    assert torch.equal(resumed.measurer.tracker.inputs, first.measurer.tracker.inputs)
    assert resumed.last_columns == first.last_columns and resumed.last_columns["pred_change"] == 0.0
