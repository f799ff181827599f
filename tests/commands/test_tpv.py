"""``valfree tpv`` in-process: table, resumable CSV, failures kept, train-vs-test plot, errors."""

import csv

import pytest
import torch

from valfree.cli import main
from valfree.models import mlp

FACTORY = '''
from valfree.models import mlp


def small():
    return mlp(num_classes=10, in_size=8, width=16, depth=1)


def wide():
    return mlp(num_classes=10, in_size=8, width=48, depth=1)
'''


@pytest.fixture()
def run_dir(tmp_path):
    (tmp_path / "factory.py").write_text(FACTORY)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    for step, scale in [(100, 0.5), (200, 2.0), (300, 1.0)]:
        torch.manual_seed(step)
        model = mlp(num_classes=10, in_size=8, width=16, depth=1)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(scale)
        torch.save(model.state_dict(), ckpts / f"step_{step}.pt")
    return tmp_path


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _args(run_dir, *extra):
    return [
        "tpv", str(run_dir / "ckpts"), "--model", f"{run_dir / 'factory.py'}:small", "--data", "digits",
        "--noise", "iso:1e-2", "--inputs", "48", "--probes", "2", "--quiet", "--out", str(run_dir / "tpv.csv"), *extra,
    ]


def test_trajectory_table_csv_peak_and_resume(run_dir, capsys):
    assert main(_args(run_dir)) == 0
    text = capsys.readouterr().out
    assert "train TPV ± stderr" in text and "argmax-TPV checkpoint: step 200, an interior peak" in text and "interior peak" in text
    rows = _rows(run_dir / "tpv.csv")
    assert [r["step"] for r in rows] == ["100", "200", "300"] and all(r["status"] == "ok" for r in rows)
    values = [float(r["tpv"]) for r in rows]
    assert values[1] > values[2] > values[0] and all(float(r["tpv_stderr"]) > 0 for r in rows)
    assert main(_args(run_dir)) == 0
    assert "measured 0, skipped 3" in capsys.readouterr().out
    # The same file with another noise would mix incomparable rows: refused.
    other = _args(run_dir)
    other[other.index("iso:1e-2")] = "quant:8"
    assert main(other) == 2
    assert "holds TPV results with noise='iso:0.01'" in capsys.readouterr().err


def test_a_corrupt_checkpoint_is_recorded_and_the_others_still_run(run_dir, capsys):
    (run_dir / "ckpts" / "step_400.pt").write_bytes(b"not a checkpoint")
    assert main(_args(run_dir)) == 1
    rows = {r["step"]: r for r in _rows(run_dir / "tpv.csv")}
    assert rows["400"]["status"] == "failed" and "not a readable torch checkpoint" in rows["400"]["error"]
    assert all(rows[s]["status"] == "ok" for s in ("100", "200", "300"))
    assert "failed: " in capsys.readouterr().out


def test_test_data_adds_ratio_verdict_and_plot(run_dir, capsys):
    out = run_dir / "tpv.csv"
    assert main(_args(run_dir, "--test-data", "digits")) == 0
    text = capsys.readouterr().out
    assert "train/test [95% CI]" in text and (run_dir / "tpv.png").stat().st_size > 1000
    for r in _rows(out):
        assert float(r["test_tpv"]) > 0 and float(r["ratio_low"]) <= float(r["ratio"]) <= float(r["ratio_high"])
        assert r["verdict"] in ("stable", "unstable", "inconclusive")


def test_rank_models_of_two_widths(run_dir, capsys):
    torch.manual_seed(0)
    from valfree.io import build_model

    ckpt_small = run_dir / "small.pt"
    ckpt_wide = run_dir / "wide.pt"
    torch.save(build_model(f"{run_dir / 'factory.py'}:small").state_dict(), ckpt_small)
    torch.save(build_model(f"{run_dir / 'factory.py'}:wide").state_dict(), ckpt_wide)
    args = ["tpv", str(ckpt_small), str(ckpt_wide), "--model", f"{run_dir / 'factory.py'}:small",
            "--model", f"{run_dir / 'factory.py'}:wide", "--data", "digits", "--noise", "quant:8:channel",
            "--skip", "head", "--inputs", "32", "--probes", "2", "--quiet", "--rank", "--out", str(run_dir / "rank.csv")]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("rank") and lines[1].startswith("1 ") and lines[2].startswith("2 ")
    rows = _rows(run_dir / "rank.csv")
    assert {r["model"].rsplit(":", 1)[1] for r in rows} == {"small", "wide"}


@pytest.mark.parametrize("noise, message", [("quant:0", "bits from 1 to 32"), ("gauss:1", "unknown noise spec")])
def test_bad_noise_exits_2_with_one_sentence(run_dir, capsys, noise, message):
    args = _args(run_dir)
    args[args.index("iso:1e-2")] = noise
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_options_that_would_fail_every_checkpoint_are_refused_up_front(run_dir, capsys):
    args = _args(run_dir)
    args[args.index("--probes") + 1] = "1"
    args[args.index("--out") + 1] = str(run_dir / "x.csv")
    assert main(args) == 2
    assert "argument --probes: must be an integer of at least 2" in capsys.readouterr().err
    assert not (run_dir / "x.csv").exists()
