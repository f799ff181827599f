"""`valfree score --preset` on checkpoints of each kind: every row equals the library call on the same
seeded probe batch, and the row records the preset's measured selection mode."""

import csv
import math

import pytest
import torch

from valfree.cli import build_parser, main
from valfree.io.data import probe_batch
from valfree.probes import diffusion_head_gradient, head_gradient, head_gradients, lm_head_gradient
from valfree.probes.presets import PRESETS

from . import preset_models as pm

MOD = "tests.commands.preset_models"


def save_two_checkpoints(factory, folder):
    """The factory's weights at step 1 and a perturbed copy at step 2."""
    folder.mkdir()
    model = factory()
    torch.save(model.state_dict(), folder / "step_1.pt")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    torch.save(model.state_dict(), folder / "step_2.pt")
    return folder


def score(tmp_path, factory, data, preset, *extra):
    ckpts = save_two_checkpoints(getattr(pm, factory), tmp_path / "ckpts")
    out = tmp_path / "scores.csv"
    code = main(["score", str(ckpts), "--model", f"{MOD}:{factory}", "--data", f"{MOD}:{data}", "--preset", preset,
                 "--out", str(out), *extra])
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    return code, rows, ckpts


def reference_models(factory, ckpts):
    for step in (1, 2):
        model = getattr(pm, factory)()
        model.load_state_dict(torch.load(ckpts / f"step_{step}.pt", weights_only=True))
        yield model


def check(rows, expected, preset):
    assert [r["status"] for r in rows] == ["ok", "ok"], rows[0].get("error")
    assert all(r["preset"] == preset and r["mode"] == PRESETS[preset].mode for r in rows)
    for row, value in zip(rows, expected):
        assert float(row["grad_norm"]) == pytest.approx(value, rel=1e-5)
    assert expected[0] != pytest.approx(expected[1], rel=1e-3)  # the checkpoints really differ


def test_segmentation_preset(tmp_path):
    code, rows, ckpts = score(tmp_path, "seg_model", "seg_data", "segmentation")
    assert code == 0
    x, y = probe_batch(pm.seg_data(), 256, 0)
    y = y.clone()
    y[y == 255] = -100
    check(rows, [head_gradient(m, x, y).grad_norm for m in reference_models("seg_model", ckpts)], "segmentation")
    assert int(rows[0]["batch_size"]) == 12 * 5 * 6  # void pixels are not samples


def test_centernet_preset_reports_each_head_and_the_joint_score(tmp_path):
    code, rows, ckpts = score(tmp_path, "TinyCenterNet", "det_data", "centernet")
    assert code == 0
    x, y = probe_batch(pm.det_data(), 256, 0)
    expected = [head_gradients(m, x, {"heatmap": y[:, :3], "box": y[:, 3:]}, {"heatmap": "focal", "box": "l1"},
                               {"box": 0.1}) for m in reference_models("TinyCenterNet", ckpts)]
    check(rows, [e.grad_norm for e in expected], "centernet")
    for row, e in zip(rows, expected):
        hm, box = float(row["heatmap.grad_norm"]), float(row["box.grad_norm"])
        assert float(row["grad_norm"]) == pytest.approx(math.sqrt(hm**2 + (0.1 * box) ** 2), rel=1e-9)
        assert hm == pytest.approx(e.heads["heatmap"].grad_norm, rel=1e-6)


@pytest.mark.parametrize("preset,prediction", [("diffusion-eps", "epsilon"), ("diffusion-v", "v")])
def test_diffusion_presets_use_the_model_schedule_and_the_seed(tmp_path, preset, prediction):
    code, rows, ckpts = score(tmp_path, "TinyDenoiser", "diffusion_data", preset, "--seed", "3")
    assert code == 0
    x, _ = probe_batch(pm.diffusion_data(), 256, 3)
    check(rows, [diffusion_head_gradient(m, x, m.alphas_cumprod, prediction=prediction, seed=3).grad_norm
                 for m in reference_models("TinyDenoiser", ckpts)], preset)


def test_lm_preset_on_a_tied_gpt2(tmp_path):
    pytest.importorskip("transformers")
    code, rows, ckpts = score(tmp_path, "gpt2", "token_data", "lm")
    assert code == 0
    x, _ = probe_batch(pm.token_data(), 256, 0)
    check(rows, [lm_head_gradient(m, x).grad_norm for m in reference_models("gpt2", ckpts)], "lm")
    assert rows[0]["tied"] == "True" and int(rows[0]["batch_size"]) == 12 * 7


def test_a_3x3_head_and_loss_with_preset_are_one_clear_error(tmp_path, capsys):
    ckpts = save_two_checkpoints(pm.ThreeByThreeOut, tmp_path / "ckpts")
    args = ["score", str(ckpts), "--model", f"{MOD}:ThreeByThreeOut", "--data", f"{MOD}:diffusion_data",
            "--out", str(tmp_path / "s.csv")]
    assert main(args + ["--preset", "diffusion-eps", "--head", "conv_out"]) == 2
    err = capsys.readouterr().err
    assert "module 'conv_out' is a Conv2d with kernel_size (3, 3)" in err and "1x1 convolution" in err
    assert main(args + ["--preset", "diffusion-eps", "--loss", "mse"]) == 2
    assert "--loss and --preset cannot be combined" in capsys.readouterr().err


def test_cli_preset_choices_are_the_registry():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    preset = next(a for a in sub.choices["score"]._actions if a.dest == "preset")
    assert list(preset.choices) == list(PRESETS)
