"""Every bad argument is one sentence on stderr and exit code 2, decided before any loop, never a
traceback; and the argument types agree with the registries they stand in for."""

from __future__ import annotations

import argparse
import json
import math

import numpy as np
import pytest
import torch

from valfree.cli import main
from valfree.commands import arguments

MODEL = "valfree.models:digits_cnn"


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """Two checkpoints of the untrained digits CNN: enough for every check made before the loop."""
    from valfree.models import digits_cnn

    folder = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    for step in (10, 20):
        torch.save(digits_cnn().state_dict(), folder / f"step_{step}.pt")
    return folder


@pytest.fixture(scope="module")
def scores_csv(ckpts, tmp_path_factory):
    out = tmp_path_factory.mktemp("scores") / "scores.csv"
    assert main(["score", str(ckpts), "--model", MODEL, "--data", "digits", "--out", str(out), "--quiet"]) == 0
    return out


def one_sentence(capsys, code, *needles):
    captured = capsys.readouterr()
    err = captured.err
    assert code == 2, err
    assert "Traceback" not in err and "Traceback" not in captured.out
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


# (arguments after the command's required ones, text the sentence must contain)
SCORE_BAD = [
    (["--batch-size", "-5"], "--batch-size: must be a positive integer"),
    (["--batch-size", "0"], "--batch-size: must be a positive integer"),
    (["--batch-size", "2.5"], "--batch-size: '2.5' is not an integer"),
    (["--label-smoothing", "2"], "--label-smoothing: must lie in [0, 1)"),
    (["--label-smoothing", "nan"], "--label-smoothing: must be a finite number"),
    (["--label-smoothing", "-0.1"], "--label-smoothing: must lie in [0, 1)"),
    (["--seed", "-1"], "--seed: must be zero or a positive integer"),
    (["--loss", "hinge"], "--loss: invalid choice"),
    (["--device", "bogus"], "'bogus' is not a torch device"),
    (["--device", "meta"], "--device meta holds shapes but no values"),
    (["--device", "cuda:0" if torch.cuda.is_available() else "cuda"],
     "CUDA" if not torch.cuda.is_available() else "cuda"),
]


@pytest.mark.parametrize("extra, needle", SCORE_BAD, ids=[" ".join(a) for a, _ in SCORE_BAD])
def test_score_refuses_bad_arguments(ckpts, tmp_path, capsys, extra, needle):
    if extra[:2] == ["--device", "cuda:0"]:
        pytest.skip("a GPU is present: --device cuda is valid here")
    out = tmp_path / "s.csv"
    code = main(["score", str(ckpts), "--model", MODEL, "--data", "digits", "--out", str(out), *extra])
    one_sentence(capsys, code, needle)
    assert not out.exists()  # refused before the loop: nothing written


def test_cuda_on_a_cpu_build_names_the_build(ckpts, tmp_path, capsys):
    if torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build")
    code = main(["score", str(ckpts), "--model", MODEL, "--data", "digits", "--out", str(tmp_path / "s.csv"),
                 "--device", "cuda"])
    one_sentence(capsys, code, "CPU-only", "--device cpu")


def test_cuda_index_past_the_last_gpu(ckpts, tmp_path, capsys):
    code = main(["score", str(ckpts), "--model", MODEL, "--data", "digits", "--out", str(tmp_path / "s.csv"),
                 "--device", "cuda:99"])
    one_sentence(capsys, code, "--device cuda:99")


@pytest.mark.parametrize("extra, needle", [
    (["--ema", "nan"], "--ema: must be a finite number"),
    (["--ema", "inf"], "--ema: must be a finite number"),
    (["--ema", "-2"], "--ema: must be an EMA span of 0 or more"),
    (["--tail", "abc"], "--tail: 'abc' is not a number"),
    (["--tail", "0"], "--tail: must be a fraction like 0.2 or a count like 10"),
    (["--tail", "-0.2"], "--tail: must be a fraction like 0.2 or a count like 10"),
    (["--tail", "2.5"], "--tail: must be a fraction in (0, 1] or a whole count"),
    (["--tail", "nan"], "--tail: must be a finite number"),
    (["--mode", "median"], "--mode: invalid choice"),
])
def test_select_refuses_bad_numbers(scores_csv, capsys, extra, needle):
    one_sentence(capsys, main(["select", str(scores_csv), *extra]), needle)


def test_select_on_files_that_are_not_scores(tmp_path, capsys):
    garbage = tmp_path / "garbage.csv"
    garbage.write_bytes(bytes(range(256)) * 8)
    one_sentence(capsys, main(["select", str(garbage)]), "is a binary file")
    text = tmp_path / "text.csv"
    text.write_text("hello,world\n1,2\n")
    one_sentence(capsys, main(["select", str(text)]), "is not a results CSV")


@pytest.mark.parametrize("state", [[1, 2, 3], {"log_history": {"a": 1}}, {"log_history": [1, 2]}, "not json"])
def test_select_on_a_trainer_state_of_the_wrong_shape(tmp_path, capsys, state):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text(state if isinstance(state, str) else json.dumps(state))
    one_sentence(capsys, main(["select", str(run)]), "trainer_state.json")


def test_report_refuses_bad_metrics_and_outputs(scores_csv, tmp_path, capsys):
    text = tmp_path / "text.csv"
    text.write_text("step,accuracy\n10,high\n20,low\n")
    code = main(["report", str(scores_csv), "--metrics", str(text), "-o", str(tmp_path / "r.html")])
    one_sentence(capsys, code, "'high' in its 'accuracy' column on line 2")
    binary = tmp_path / "metrics.bin"
    binary.write_bytes(b"\x00\x01\x02" * 100)
    code = main(["report", str(scores_csv), "--metrics", str(binary), "-o", str(tmp_path / "r.html")])
    one_sentence(capsys, code, "is a binary file")
    folder = tmp_path / "folder"
    folder.mkdir()
    one_sentence(capsys, main(["report", str(scores_csv), "-o", str(folder)]), "is a folder")
    one_sentence(capsys, main(["report", str(scores_csv), "--output", str(folder)]), "is a folder")


def test_outputs_that_cannot_be_written(ckpts, scores_csv, tmp_path, capsys):
    a_file = tmp_path / "plain"
    a_file.write_text("")
    code = main(["score", str(ckpts), "--model", MODEL, "--data", "digits", "--out", str(a_file / "s.csv")])
    one_sentence(capsys, code, "is a file, not a folder")
    folder = tmp_path / "dir"
    folder.mkdir()
    code = main(["score", str(ckpts), "--model", MODEL, "--data", "digits", "--out", str(folder)])
    one_sentence(capsys, code, "is a folder")
    code = main(["demo", "--out", str(a_file)])
    one_sentence(capsys, code, "is a file")


def test_tpv_plot_into_a_folder_is_refused(ckpts, tmp_path, capsys):
    folder = tmp_path / "plots"
    folder.mkdir()
    code = main(["tpv", str(ckpts), "--model", MODEL, "--data", "digits", "--noise", "iso:1e-3",
                 "--out", str(tmp_path / "t.csv"), "--plot", str(folder)])
    one_sentence(capsys, code, "--plot", "is a folder")
    assert not (tmp_path / "t.csv").exists()


@pytest.mark.parametrize("extra, needle", [
    (["--ratio", "nan"], "--ratio: must be a finite number"),
    (["--ratio", "0"], "--ratio: must lie strictly between 0 and 1"),
    (["--confidence", "1.5"], "--confidence: must lie between 0 and 1"),
    (["--steps", "0"], "--steps: must be a positive integer"),
    (["--finetune-lr", "inf"], "--finetune-lr: must be a finite number"),
    (["--device", "meta"], "--device meta"),
])
def test_prune_refuses_bad_arguments(ckpts, tmp_path, capsys, extra, needle):
    code = main(["prune", str(ckpts / "step_10.pt"), "--model", MODEL, "--data", "digits",
                 "-o", str(tmp_path / "p.safetensors"), *extra])
    one_sentence(capsys, code, needle)


def test_wrong_input_width_is_the_users_mistake(ckpts, tmp_path, capsys):
    data = tmp_path / "wide.npz"
    np.savez(data, x=np.random.rand(20, 3, 8, 8).astype(np.float32), y=np.arange(20) % 10)
    out = tmp_path / "s.csv"
    code = main(["score", str(ckpts), "--model", MODEL, "--data", f"npz:{data}", "--out", str(out)])
    one_sentence(capsys, code, "the model cannot take the --data inputs")
    assert not out.exists()


def test_a_factory_that_calls_sys_exit_gets_a_message(ckpts, tmp_path, capsys, monkeypatch):
    (tmp_path / "exiting_factory.py").write_text("import sys\nsys.exit(0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["score", str(ckpts), "--model", "exiting_factory:net", "--data", "digits",
                 "--out", str(tmp_path / "s.csv")])
    one_sentence(capsys, code, "sys.exit(0)")


def test_numeric_types_refuse_nan_inf_and_out_of_range():
    cases = {
        arguments.positive_int: ["0", "-5", "nan", "1e3", ""],
        arguments.nonnegative_int: ["-1", "x"],
        arguments.fraction: ["0", "1", "nan", "inf", "-inf"],
        arguments.probability: ["-0.1", "1.01", "nan"],
        arguments.finite_float: ["nan", "inf", "-inf", "NaN", "x"],
        arguments.positive_float: ["0", "-1", "inf"],
        arguments.label_smoothing: ["1", "2", "nan"],
        arguments.ema_span: ["-1", "nan", "inf"],
        arguments.tail: ["0", "-1", "1.5", "nan", "inf"],
        arguments.at_least(2): ["1", "0", "two"],
    }
    for parse, bad in cases.items():
        for text in bad:
            with pytest.raises(argparse.ArgumentTypeError):
                parse(text)
    assert arguments.positive_int("7") == 7
    assert arguments.fraction("0.3") == 0.3
    assert arguments.tail("10") == "10" and arguments.tail("1.0") == "1.0" and arguments.tail("0.2") == "0.2"
    assert arguments.ema_span("1") == 1 and arguments.label_smoothing("0") == 0
    assert math.isclose(arguments.probability("1"), 1.0)


def test_choices_agree_with_the_registries():
    from valfree.io.data import SPLITS
    from valfree.probes import LOSSES
    from valfree.probes.presets import PRESETS
    from valfree.pruning.options import TARGETS
    from valfree.selection import MODES
    from valfree.tpv import METHODS
    from valfree.tpv.estimators import OUTPUTS

    assert arguments.LOSSES == tuple(LOSSES)
    assert arguments.PRESETS == tuple(PRESETS)
    assert arguments.SPLITS == tuple(SPLITS)
    assert arguments.MODES == tuple(MODES)
    assert arguments.TPV_METHODS == tuple(METHODS)
    assert arguments.TPV_OUTPUTS == tuple(OUTPUTS)
    assert arguments.PRUNE_TARGETS == tuple(TARGETS)


def test_a_checkpoints_own_failure_stays_a_failed_row(ckpts, tmp_path, capsys):
    """The other side of the line: a corrupt file among good ones is a failed row and exit code 1."""
    import shutil

    folder = tmp_path / "mixed"
    shutil.copytree(ckpts, folder)
    (folder / "step_30.pt").write_bytes(b"not a checkpoint")
    out = tmp_path / "s.csv"
    assert main(["score", str(folder), "--model", MODEL, "--data", "digits", "--out", str(out), "--quiet"]) == 1
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("body, needle", [
    ("return None", "not a map-style torch Dataset"),
    ("return ['a', 'b', 'c']", "cannot be batched"),
    ("return {'x': 1}", "cannot be batched"),
])
def test_a_data_function_returning_no_dataset(ckpts, tmp_path, capsys, monkeypatch, body, needle):
    name = f"odd_data_{abs(hash(body)) % 10**8}"  # a module name per case: imports are cached
    (tmp_path / f"{name}.py").write_text(f"def data():\n    {body}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code = main(["score", str(ckpts), "--model", MODEL, "--data", f"{name}:data", "--out", str(tmp_path / "s.csv")])
    one_sentence(capsys, code, needle)
