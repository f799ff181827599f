"""`valfree score`, `select` and `report` on a real digits trajectory, and every bad input of the core."""

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from valfree.cli import main
from valfree.commands.demo import accuracy
from valfree.io.checkpoints import load_into
from valfree.io.data import load_dataset
from valfree.models import digits_cnn

MODEL = "valfree.models:digits_cnn"


def rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_score_select_report_and_resume(run_dir, tmp_path, capsys):
    out = tmp_path / "scores.csv"
    assert main(["score", str(run_dir), "--model", MODEL, "--data", "digits", "--out", str(out)]) == 0
    table = rows(out)
    assert len(table) == 12 and all(r["status"] == "ok" for r in table)
    steps = [int(r["step"]) for r in table]
    assert steps == sorted(steps)
    for field in ("grad_norm", "score_w", "score_z", "bias_grad_norm", "loss", "entropy", "confidence", "margin", "batch_size"):
        assert all(np.isfinite(float(r[field])) for r in table), field
    # the probe is the real thing: the CLI value equals the library call on the same batch
    from valfree import head_gradient
    from valfree.io.data import probe_batch

    x, y = probe_batch(load_dataset("digits"), 256, 0)
    model = load_into(digits_cnn(), run_dir / f"step_{steps[-1]:06d}.pt")
    assert float(table[-1]["grad_norm"]) == pytest.approx(head_gradient(model, x, y).grad_norm, rel=1e-6)
    # At initialisation the features carry no signal and the head gradient is small; it rises, then
    # falls as the features separate. That early dip is why selection looks only at a tail window.
    g = [float(r["grad_norm"]) for r in table]
    assert g[-1] < 0.5 * max(g) and int(np.argmax(g)) < len(g) // 2

    mtime_before = out.stat().st_mtime_ns
    capsys.readouterr()
    assert main(["score", str(run_dir), "--model", MODEL, "--data", "digits", "--out", str(out)]) == 0
    assert "scored 0, skipped 12" in capsys.readouterr().out
    assert out.stat().st_mtime_ns == mtime_before and len(rows(out)) == 12

    assert main(["select", str(out)]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    chosen = printed[-1]
    assert chosen.endswith(".pt") and "<- chosen" in "\n".join(printed)
    assert main(["select", str(out), "--json", "--column", "score_w", "--tail", "4", "--ema", "1"]) == 0
    choice = json.loads(capsys.readouterr().out)
    tail = [float(r["score_w"]) for r in table[-4:]]
    assert choice["path"] == table[8 + int(np.argmin(tail))]["path"] and choice["window"] == [8, 12]

    test = load_dataset("digits", "test")
    metrics = tmp_path / "heldout.csv"
    with open(metrics, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "test_accuracy"])
        for r in table:
            w.writerow([r["path"], accuracy(load_into(digits_cnn(), r["path"]), test)])
    report = tmp_path / "report.html"
    assert main(["report", str(out), "--metrics", str(metrics), "-o", str(report)]) == 0
    page = report.read_text()
    # the probe's series, prediction changes under it, and the scatter against the held-out metric
    assert page.count("data:image/png;base64,") == 3 and "Gap to the oracle" in page and "Spearman" in page
    assert "points of test_accuracy" in page and "the last 20 % of the run" in page and "rule <b>" in page.lower()


def test_new_checkpoint_is_scored_on_rerun(run_dir, tmp_path, capsys):
    out = tmp_path / "s.csv"
    main(["score", str(run_dir), "--model", MODEL, "--data", "digits", "--out", str(out)])
    shutil.copy(run_dir / "step_000024.pt", run_dir / "step_000999.pt")
    capsys.readouterr()
    assert main(["score", str(run_dir), "--model", MODEL, "--data", "digits", "--out", str(out)]) == 0
    assert "scored 1, skipped 12" in capsys.readouterr().out


def test_corrupt_and_mismatched_checkpoints_become_failed_rows(run_dir, tmp_path, capsys):
    (run_dir / "step_000500.pt").write_bytes(b"\x00garbage")
    sd = torch.load(run_dir / "step_000024.pt", weights_only=True)
    sd.pop("fc.bias")
    torch.save(sd, run_dir / "step_000600.pt")
    out = tmp_path / "s.csv"
    capsys.readouterr()
    assert main(["score", str(run_dir), "--model", MODEL, "--data", "digits", "--out", str(out)]) == 1
    table = {r["step"]: r for r in rows(out)}
    assert len(table) == 14 and sum(r["status"] == "ok" for r in table.values()) == 12
    assert "not a readable torch checkpoint" in table["500"]["error"]
    assert "missing keys fc.bias" in table["600"]["error"]
    assert "failed 2" in capsys.readouterr().out
    assert main(["select", str(out)]) == 0  # failed rows are reported, never chosen
    assert "2 without a finite grad_norm" in capsys.readouterr().out


def test_unsafe_pickle_is_refused_per_row(run_dir, tmp_path):
    torch.save(digits_cnn(), run_dir / "step_000700.pt")  # a whole pickled module
    out = tmp_path / "s.csv"
    assert main(["score", str(run_dir), "--model", MODEL, "--data", "digits", "--out", str(out)]) == 1
    bad = [r for r in rows(out) if r["status"] == "failed"]
    assert len(bad) == 1 and "arbitrary unpickling" in bad[0]["error"] and "convert it once" in bad[0]["error"]


def test_nan_logits_flagged_and_others_intact(run_dir, tmp_path):
    sd = torch.load(run_dir / "step_000024.pt", weights_only=True)
    sd["fc.weight"][:] = float("nan")
    torch.save(sd, run_dir / "step_000800.pt")
    out = tmp_path / "s.csv"
    assert main(["score", str(run_dir), "--model", MODEL, "--data", "digits", "--out", str(out)]) == 1
    table = rows(out)
    assert sum(r["status"] == "ok" for r in table) == 12
    nan_row = [r for r in table if r["step"] == "800"][0]
    assert "non-finite weights (NaN or inf) in fc.weight" in nan_row["error"]
    assert nan_row["status"] == "nonfinite"  # its own status: neither a result nor a broken file


def test_labels_out_of_range_are_one_sentence_before_the_loop(run_dir, tmp_path, capsys):
    # The same mistake for every checkpoint is the user's: one sentence, exit 2, no failed rows.
    data = tmp_path / "d.npz"
    np.savez(data, x=np.random.rand(20, 1, 8, 8).astype(np.float32), y=np.arange(20) % 12)
    out = tmp_path / "s.csv"
    assert main(["score", str(run_dir), "--model", MODEL, "--data", f"npz:{data}", "--out", str(out)]) == 2
    assert "labels go up to 11, but the model has 10 outputs" in capsys.readouterr().err
    assert not out.exists() or not rows(out)


def test_single_class_batch_is_flagged(run_dir, tmp_path):
    data = tmp_path / "one.npz"
    np.savez(data, x=np.random.rand(30, 1, 8, 8).astype(np.float32), y=np.full(30, 3))
    out = tmp_path / "s.csv"
    assert main(["score", str(run_dir), "--model", MODEL, "--data", f"npz:{data}", "--out", str(out)]) == 0
    assert all("single class (3)" in r["warnings"] for r in rows(out))


def test_unlabeled_data_needs_pseudo(run_dir, tmp_path, capsys):
    data = tmp_path / "u.npz"
    np.savez(data, x=np.random.rand(30, 1, 8, 8).astype(np.float32))
    out = tmp_path / "s.csv"
    assert main(["score", str(run_dir), "--model", MODEL, "--data", f"npz:{data}", "--out", str(out)]) == 2
    assert "--targets pseudo" in capsys.readouterr().err
    assert main(["score", str(run_dir), "--model", MODEL, "--data", f"npz:{data}", "--out", str(out), "--targets", "pseudo"]) == 0
    assert len(rows(out)) == 12


@pytest.mark.parametrize("args,message", [
    (["--data", "imagenet"], "unknown data spec 'imagenet'"),
    (["--model", "valfree.models:nope"], "has no attribute 'nope'"),
    (["--model", "no_such_module_xyz:f"], "cannot import 'no_such_module_xyz'"),
    (["--head", "features"], "not a per-location linear map"),
])
def test_user_errors_are_one_sentence_and_exit_2(run_dir, tmp_path, capsys, args, message):
    base = {"--model": MODEL, "--data": "digits"}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = value
    argv = ["score", str(run_dir), "--out", str(tmp_path / "s.csv")] + [x for kv in base.items() for x in kv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_failing_factory_and_empty_folder(tmp_path, capsys):
    (tmp_path / "factory.py").write_text("def broken():\n    raise RuntimeError('boom')\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["score", str(empty), "--model", MODEL, "--data", "digits"]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    ck = tmp_path / "c"
    ck.mkdir()
    torch.save(digits_cnn().state_dict(), ck / "step_1.pt")
    assert main(["score", str(ck), "--model", f"{tmp_path / 'factory.py'}:broken", "--data", "digits",
                 "--out", str(tmp_path / "s.csv")]) == 2
    assert "raised RuntimeError: boom" in capsys.readouterr().err


def test_select_errors(tmp_path, capsys):
    assert main(["select", str(tmp_path / "none.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "s.csv").write_text("step,path,status,grad_norm\n1,a,ok,0.5\n")
    assert main(["select", str(tmp_path / "s.csv"), "--column", "nope"]) == 2
    assert "no column 'nope'" in capsys.readouterr().err
    assert main(["select", str(tmp_path / "s.csv"), "--tail", "abc"]) == 2
