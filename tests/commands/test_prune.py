"""``valfree prune`` on a digits checkpoint: the table, the saved file, and one-sentence errors."""

from pathlib import Path

import pytest
import torch

from valfree import prune
from valfree.cli import main
from valfree.pruning import load_pruned, read_pruned_info

FACTORY = f"{Path(__file__).with_name('prune_models.py')}:tiny_digits_cnn"


@pytest.fixture
def checkpoint(trained_cnn_state, tmp_path):
    path = tmp_path / "step=100.pt"
    torch.save(trained_cnn_state, path)
    return path


def test_prune_command_matches_the_library_and_saves_a_loadable_file(checkpoint, trained_cnn, digits, tmp_path, capsys):
    out = tmp_path / "pruned.safetensors"
    code = main(["prune", str(checkpoint), "--model", FACTORY, "--data", "digits", "--criterion", "jbr",
                 "--ratio", "0.5", "--steps", "2", "--calibration-size", "256", "--test-data", "digits",
                 "-o", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    assert "params" in printed and "MACs" in printed and "accuracy" in printed and f"wrote {out}" in printed
    library = prune(trained_cnn, digits[0], "jbr", ratio=0.5, steps=2, calibration_size=256)
    x = digits[1].tensors[0][:64]
    with torch.no_grad():
        torch.testing.assert_close(load_pruned(out)(x), library.model(x), rtol=0, atol=1e-6)
    info = read_pruned_info(out)
    assert info["checkpoint"] == str(checkpoint) and info["history"][-1]["params"] == library.final.params
    accuracy = info["history"][-1]["accuracy"]
    assert f"{100 * accuracy:.2f}%" in printed


@pytest.mark.parametrize("args, message", [
    (["--criterion", "l2"], "unknown pruning criterion 'l2'"),
    (["--ratio", "1.5"], "argument --ratio: must lie strictly between 0 and 1"),
    (["--criterion", "taylor", "--data", "npz:{unlabelled}"], "has missing labels"),
    (["--confidence", "0.99999"], "lower the threshold"),
])
def test_prune_command_errors_are_one_sentence(checkpoint, tmp_path, capsys, args, message):
    import numpy as np

    unlabelled = tmp_path / "x.npz"
    np.savez(unlabelled, x=np.random.default_rng(0).normal(size=(64, 1, 8, 8)).astype("float32"))
    base = ["prune", str(checkpoint), "--model", FACTORY, "--data", "digits", "-o", str(tmp_path / "p.safetensors")]
    args = [a.format(unlabelled=unlabelled) for a in args]
    code = main(base + args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.safetensors").exists()


def test_prune_command_refuses_a_checkpoint_that_does_not_fit(tmp_path, capsys):
    wrong = tmp_path / "wrong.pt"
    torch.save({"weight": torch.zeros(3)}, wrong)
    code = main(["prune", str(wrong), "--model", FACTORY, "--data", "digits", "-o", str(tmp_path / "p.safetensors")])
    assert code == 2 and "does not fit the model" in capsys.readouterr().err
