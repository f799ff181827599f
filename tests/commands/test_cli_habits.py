"""The habits every command follows: help text and defaults in --help, one output flag, --quiet, no
progress frames outside a terminal, integers in JSON, and a parser that loads without torch."""

from __future__ import annotations

import argparse
import inspect
import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from valfree.cli import COMMANDS, build_parser, main

ROOT = Path(__file__).resolve().parents[2]
MODEL = "valfree.models:digits_cnn"


def subparsers():
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return parser, sub.choices


def test_every_command_is_listed_in_the_top_level_help():
    parser, commands = subparsers()
    text = parser.format_help()
    assert set(commands) == {c.__name__.rsplit(".", 1)[-1] for c in COMMANDS}
    for name in commands:
        assert name in text


@pytest.mark.parametrize("name", ["score", "select", "report", "tpv", "prune", "demo"])
def test_every_option_has_help_and_shows_its_default(name):
    _, commands = subparsers()
    parser = commands[name]
    formatter = parser._get_formatter()
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        label = "/".join(action.option_strings) or action.dest
        assert action.help and action.help is not argparse.SUPPRESS, f"{name} {label} has no help text"
        default = action.default
        if default is None or isinstance(default, bool) or default == [] or not action.option_strings:
            continue
        shown = formatter._get_help_string(action) % {"default": default, "prog": parser.prog}
        assert str(default) in shown, f"{name} {label}: default {default!r} not shown in {shown!r}"
    assert "--quiet" in text and "--help" in text


def test_one_output_flag_name():
    _, commands = subparsers()
    for name, parser in commands.items():
        outs = [a for a in parser._actions if a.dest in ("out", "output")]
        if name == "select":
            assert not outs  # select writes nothing but its answer
            continue
        assert len(outs) == 1, name
        assert outs[0].dest == "out" and "-o" in outs[0].option_strings and "--out" in outs[0].option_strings
    for name in ("report", "prune"):  # the old name stays an alias
        (out,) = [a for a in commands[name]._actions if a.dest == "out"]
        assert "--output" in out.option_strings


def test_help_and_parser_load_without_torch():
    code = (
        "import sys\n"
        "from valfree.cli import build_parser\n"
        "p = build_parser()\n"
        "for cmd in ('score', 'select', 'report', 'tpv', 'prune', 'demo'):\n"
        "    p.parse_known_args([cmd])\n"
        "heavy = sorted(m for m in ('torch', 'scipy', 'matplotlib', 'transformers', 'lightning') if m in sys.modules)\n"
        "print(','.join(heavy))\n"
    )
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT)
    assert out.stdout.strip() == "", f"building the parser imported {out.stdout.strip()} ({out.stderr[-500:]})"
    for argv in (["--help"], ["score", "--help"], ["tpv", "--help"]):
        probe = ("import sys, runpy\nsys.argv = ['valfree', *%r]\ntry:\n    runpy.run_module('valfree', run_name='__main__')\n"
                 "except SystemExit:\n    pass\nprint('TORCH' if 'torch' in sys.modules else 'NO-TORCH', file=sys.stderr)\n" % (argv,))
        out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, cwd=ROOT)
        assert "NO-TORCH" in out.stderr, (argv, out.stderr[-500:])
        assert "usage: valfree" in out.stdout


def test_import_valfree_is_lazy_and_names_still_resolve():
    code = (
        "import sys, valfree\n"
        "assert 'torch' not in sys.modules, 'import valfree loaded torch'\n"
        "assert callable(valfree.select_checkpoint) and callable(valfree.head_gradient)\n"
        "assert callable(valfree.tpv) and valfree.ValfreeError\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}, cwd=ROOT)
    assert out.stdout.strip() == "ok", out.stderr[-800:]


def test_valfree_tpv_shows_its_real_signature():
    import valfree
    from valfree.tpv.estimators import tpv

    assert inspect.signature(valfree.tpv) == inspect.signature(tpv)
    assert list(inspect.signature(valfree.tpv).parameters)[:3] == ["model", "inputs", "noise"]


def test_head_gradient_without_targets_warns_once(monkeypatch):
    import valfree
    from valfree.models import digits_cnn

    monkeypatch.setattr(valfree, "_warned_pseudo", False)
    model, x = digits_cnn(), torch.rand(8, 1, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        a = valfree.head_gradient(model, x)
        valfree.head_gradient(model, x)
        b = valfree.head_gradient(model, x, "pseudo")
    pseudo = [w for w in caught if "pseudo-labels" in str(w.message)]
    assert len(pseudo) == 1 and issubclass(pseudo[0].category, FutureWarning)
    assert a.grad_norm == pytest.approx(b.grad_norm)
    assert "targets" in inspect.signature(valfree.head_gradient).parameters


def test_gap_to_oracle_takes_a_selection_and_explains_a_bad_index():
    from valfree import ValfreeError, gap_to_oracle, select_checkpoint

    sel = select_checkpoint([10, 20, 30, 40], [4.0, 3.0, 2.0, 2.5], tail=1.0, ema=1)
    metric = [0.5, 0.6, 0.8, 0.7]
    assert gap_to_oracle(sel, metric) == pytest.approx(0.0)
    assert gap_to_oracle(3, metric) == pytest.approx(0.1)
    assert gap_to_oracle(40, metric, steps=[10, 20, 30, 40]) == pytest.approx(0.1)
    for bad in (558, None, "x", 1.5):
        with pytest.raises(ValfreeError):
            gap_to_oracle(bad, metric)


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    from valfree.models import digits_cnn

    folder = tmp_path_factory.mktemp("habits")
    torch.manual_seed(0)
    for step in (100, 200, 300):
        torch.save(digits_cnn().state_dict(), folder / f"step_{step}.pt")
    out = folder / "scores.csv"
    return folder, out


def test_no_progress_frames_when_not_on_a_terminal_and_select_json_integers(scored, tmp_path):
    folder, out = scored
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    run = subprocess.run([sys.executable, "-m", "valfree", "score", str(folder), "--model", MODEL, "--data", "digits",
                          "--out", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    assert "\r" not in run.stderr and "ckpt/s" not in run.stderr and "it/s" not in run.stderr
    run = subprocess.run([sys.executable, "-m", "valfree", "select", str(out), "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert isinstance(result["step"], int) and result["step"] in (100, 200, 300)
    assert '"step": ' + str(result["step"]) + "," in run.stdout
    assert all(isinstance(i, int) for i in result["window"]) and isinstance(result["index"], int)
    run = subprocess.run([sys.executable, "-m", "valfree", "select", str(out), "--quiet"],
                         capture_output=True, text=True, env=env, cwd=tmp_path)
    assert run.stdout.strip().splitlines() == [result["path"]]


def test_help_exits_zero_from_main(capsys):
    assert main(["--help"]) == 0
    assert main(["score", "--help"]) == 0
    assert "(default: 256)" in capsys.readouterr().out


def test_tpv_plot_labels_steps_and_names_its_error_bars(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from valfree.commands import tpv as tpv_command

    rows = [{"status": "ok", "step": s, "tpv": t, "tpv_stderr": 0.01, "tpv_input_stderr": 0.02, "test_tpv": t * 1.1,
             "test_tpv_input_stderr": 0.02, "noise": "iso:0.001"} for s, t in ((100, 1.0), (200, 1.5), (300, 2.0))]
    seen = {}
    real_close = plt.close

    def keep(fig):
        seen["fig"] = fig
        real_close(fig)

    monkeypatch.setattr(plt, "close", keep)
    path = tpv_command.write_plot(rows, tmp_path / "t.png")
    assert Path(path).exists()
    ax = seen["fig"].axes[0]
    texts = {t.get_text() for t in ax.texts}
    assert {"100", "200", "300"} <= texts
    legend = " ".join(t.get_text() for t in ax.get_legend().get_texts())
    assert "standard errors" in legend and "stable band" in legend
    along = [dict(r, test_tpv="") for r in rows]
    tpv_command.write_plot(along, tmp_path / "along.png")
    ax = seen["fig"].axes[0]
    assert {"100", "200", "300"} <= {t.get_text() for t in ax.texts}
    assert "standard errors" in " ".join(t.get_text() for t in ax.get_legend().get_texts())
