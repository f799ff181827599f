"""Seeded fuzzing of the command line: random argument strings, concurrent writers, kills and reruns.

    python -m tests.fuzz.cli_fuzz --count 500 --seed 1 --writers 3 --kills 5

Argument strings mix, for every subcommand, valid flags with wrong types, NaN, inf, negative and huge
numbers, missing values, unknown flags, and odd paths (missing files, a regular file used as a
folder, binary files, names that are not UTF-8, folders where a file is expected), plus garbage CSVs
for select and report and a checkpoint folder holding a live ``__reduce__`` payload. The flags come
from the parser itself, so new options are fuzzed without editing this file. Each string runs
in-process through ``valfree.cli.main`` (a sample also as a real ``python -m valfree`` process).

Then two ``valfree score`` processes write one ``--out`` at once (on the same folder, or on its two
halves), and ``valfree score`` runs are killed (SIGKILL or SIGTERM) at a random point and rerun.

Prints one JSON line of counts. Exit 1 on: a traceback, an exit code outside {0, 1, 2}, an exit 2
whose stderr is not one line, an executed payload, a run over its time limit, a lost or duplicated
row, or peak memory above ``--max-rss-mb``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tests.fuzz.craft import LivePayload

REPO = Path(__file__).resolve().parents[2]
RUN_SECONDS = 60
EXIT_CODES = {0, 1, 2}

FACTORY = '''
from torch import nn


def make():
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


def wrong():
    return nn.Sequential(nn.Linear(5, 3))


def not_a_module():
    return 42


def dataset():
    return [1, 2, 3]
'''


def tiny_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))


# ------------------------------------------------------------------------------------------ fixtures


def build_fixtures(root: Path, checkpoints: int = 6, many_checkpoints: int = 30) -> dict:
    """Every file the argument strings point at: good ones and broken ones."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    (root / "factory_mod.py").write_text(FACTORY)
    x = rng.normal(size=(96, 8)).astype("float32")
    np.savez(root / "data.npz", x=x, y=rng.integers(0, 3, size=96))
    np.savez(root / "bad_labels.npz", x=x, y=rng.integers(5, 9, size=96))
    np.savez(root / "wide.npz", x=rng.normal(size=(96, 20)).astype("float32"), y=rng.integers(0, 3, size=96))
    (root / "data_garbage.npz").write_bytes(bytes(rng.integers(0, 256, 300, dtype=np.uint8)))
    ckpts = root / "ckpts"
    ckpts.mkdir()
    torch.manual_seed(0)
    for i in range(checkpoints):
        torch.save(tiny_model().state_dict(), ckpts / f"step_{(i + 1) * 10:04d}.pt")
    # The concurrent and killed runs score more checkpoints, so that writers overlap and kills land mid-run.
    many = root / "many"
    many.mkdir()
    for i in range(many_checkpoints):
        torch.save(tiny_model().state_dict(), many / f"step_{(i + 1) * 10:04d}.pt")
    hostile = root / "hostile"
    hostile.mkdir()
    torch.save(tiny_model().state_dict(), hostile / "step_0010.pt")
    torch.save({"state_dict": LivePayload(str(root / "PAYLOAD_RAN"))}, hostile / "step_0020.pt")
    torch.save(tiny_model().state_dict(), root / "single.pt")
    (root / "binary.bin").write_bytes(bytes(rng.integers(0, 256, 2048, dtype=np.uint8)))
    (root / "not_utf8_\udcff.pt").write_bytes(b"\x00\xff" * 64)
    (root / "empty").mkdir()
    # Scores and metrics, good and broken.
    paths = sorted(str(p) for p in ckpts.iterdir())
    with open(root / "scores.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "step", "status", "grad_norm", "score_w", "score_z", "entropy"])
        for i, p in enumerate(paths):
            w.writerow([p, (i + 1) * 10, "ok", 1.0 / (i + 1), 0.5, 0.3, 0.1 * i])
    with open(root / "metrics.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["path", "test_accuracy"])
        for i, p in enumerate(paths):
            w.writerow([p, 0.5 + 0.05 * i])
    garbage = {
        "g_empty.csv": b"",
        "g_header.csv": b"path,step,status,grad_norm\n",
        "g_binary.csv": bytes(rng.integers(0, 256, 512, dtype=np.uint8)),
        "g_text.csv": b"path,step,status,grad_norm\na,x,ok,abc\nb,y,ok,nan\n",
        "g_wrongcols.csv": b"foo,bar\n1,2\n3,4\n",
        "g_latin1.csv": "path,step,status,grad_norm\nstep_\xe9.pt,1,ok,0.5\n".encode("latin-1"),
        "g_cut.csv": b"path,step,status,grad_norm\na.pt,1,ok,0.5\nb.pt,2,o",
        "g_inf.csv": b"path,step,status,grad_norm\na.pt,1,ok,inf\nb.pt,2,ok,-inf\nc.pt,3,ok,1e400\n",
        "g_dupsteps.csv": b"path,step,status,grad_norm\na.pt,1,ok,0.5\na.pt,1,ok,0.7\n",
        "g_json.csv": b'{"path": 1}\n',
        "g_nul.csv": b"path,step\x00,status\n\x00\x00\n",
        "g_metrics_text.csv": b"path,test_accuracy\n" + b"".join(f"{p},high\n".encode() for p in paths),
    }
    for name, raw in garbage.items():
        (root / name).write_bytes(raw)
    return {"root": root, "ckpts": ckpts, "paths": paths, "many": many, "many_paths": sorted(str(p) for p in many.iterdir())}


# ---------------------------------------------------------------------------------- argument strings

NUMBERS_BAD = ["nan", "NaN", "inf", "-inf", "-5", "-1", "0", "1e400", "1e-400", "abc", "", "0x10", "3.7", "99999999999",
               "-0", " 1", "1_000"]
NUMBERS_OK = {"batch_size": ["16", "32"], "seed": ["0", "3"], "label_smoothing": ["0.1"], "ema": ["1", "3"],
              "tail": ["0.5", "3", "0.2"], "ratio": ["0.3"], "steps": ["2"], "confidence": ["0.5"],
              "calibration_size": ["64"], "finetune_steps": ["0", "1"], "finetune_lr": ["0.01"], "test_size": ["50"],
              "probes": ["2"], "inputs": ["32"], "epochs": ["1"], "train_size": ["64"]}


def value_pools(fx: dict) -> dict[str, list[str]]:
    root = fx["root"]
    r = str(root)
    not_utf8 = r + "/out_\udcfe.csv"
    odd_out = [r + "/binary.bin/out.csv", r + "/empty", r + "/missing/dir/out.csv", not_utf8, "", r + "/binary.bin"]
    return {
        "model": [f"{r}/factory_mod.py:make"] * 4 + [f"{r}/factory_mod.py:wrong", f"{r}/factory_mod.py:nope",
                  f"{r}/factory_mod.py:not_a_module", "no_such_module:make", "valfree.models:digits_cnn", "::",
                  f"{r}/binary.bin:make", "os:system", f"{r}/factory_mod.py"],
        "data": [f"npz:{r}/data.npz"] * 5 + [f"npz:{r}/bad_labels.npz", f"npz:{r}/wide.npz", f"npz:{r}/data_garbage.npz",
                 f"npz:{r}/missing.npz", "fashion-mnist:/nonexistent", "bogus-spec", "", f"{r}/factory_mod.py:dataset",
                 f"npz:{r}/binary.bin", "npz:"],
        "test_data": [f"npz:{r}/data.npz", f"npz:{r}/missing.npz", "bogus"],
        "out": [f"{r}/out_{{n}}.csv"] * 4 + odd_out,
        "output": [f"{r}/out_{{n}}.html"] * 3 + odd_out,
        "plot": [f"{r}/plot_{{n}}.png", r + "/empty", r + "/binary.bin/p.png"],
        "head": ["2", "0", "nope", "", "1.weight"],
        "device": ["cpu"] * 3 + ["cuda", "bogus", "meta", "cuda:7", "mps", ""],
        "noise": ["iso:1e-3", "quant:8", "quant:4:channel", "prune:0.3", "label:0.1", "sgd:lr=0.1,batch=128",
                  "iso:nan", "iso:-1", "quant:0", "quant:abc", "prune:2", "sgd:lr=x", "bogus", ""],
        "criterion": ["jbr", "l1", "random", "taylor", "bogus", ""],
        "column": ["grad_norm", "score_w", "entropy", "nope", "path", ""],
        "metric": ["test_accuracy", "nope", ""],
        "metrics": [f"{r}/metrics.csv", f"{r}/g_metrics_text.csv", f"{r}/binary.bin", f"{r}/missing.csv", f"{r}/empty"],
        "ignore": ["0", "nope"],
        "skip": ["head", "nope"],
    }


def positional_pools(fx: dict) -> dict[str, list[str]]:
    r = str(fx["root"])
    ckpt = [str(fx["ckpts"])] * 6 + [f"{r}/hostile", f"{r}/single.pt", f"{r}/missing", f"{r}/binary.bin",
                                   f"{r}/empty", f"{r}/ckpts/*.pt", f"{r}/nomatch*.pt", f"{r}/not_utf8_\udcff.pt",
                                   f"{r}/data.npz", ""]
    scores = [f"{r}/scores.csv"] * 4 + [f"{r}/{n}" for n in sorted(os.listdir(fx["root"])) if n.startswith("g_")] + \
        [f"{r}/missing.csv", f"{r}/empty", f"{r}/binary.bin", f"{r}/ckpts", ""]
    return {"checkpoints": ckpt, "checkpoint": [f"{r}/single.pt"] * 3 + ckpt, "scores": scores}


def subcommands():
    from valfree.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: p for name, p in sub.choices.items()}


def option_value(rng: random.Random, action: argparse.Action, pools: dict, n: int) -> list[str]:
    """A value for one option: mostly plausible, sometimes hostile. May be empty (a missing value)."""
    dest = action.dest
    roll = rng.random()
    if roll < 0.06:
        return []  # the value is missing
    if action.choices is not None and dest not in pools:
        choices = [str(c) for c in action.choices]
        return [rng.choice(choices)] if roll < 0.8 else [rng.choice(["bogus", "", choices[0].upper()])]
    if dest in pools:
        return [rng.choice(pools[dest]).replace("{n}", str(n))]
    if action.type in (int, float) or dest in NUMBERS_OK:
        ok = NUMBERS_OK.get(dest, ["1"])
        return [rng.choice(ok)] if roll < 0.6 else [rng.choice(NUMBERS_BAD)]
    return [rng.choice(["x", "", "1", "\udcff", "--", "-"])]


def argument_string(rng: random.Random, name: str, parser: argparse.ArgumentParser, fx: dict, n: int) -> list[str]:
    if name == "demo":
        return ["demo", "--help"] if rng.random() < 0.7 else ["demo", "--help", rng.choice(["--epochs", "--bogus", "x"])]
    pools, positional = value_pools(fx), positional_pools(fx)
    argv = [name]
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        if not action.option_strings:  # positional
            count = 1 if action.nargs is None else rng.choice([1, 1, 2])
            if rng.random() < 0.03:
                count = 0  # a missing positional
            argv += [rng.choice(positional.get(action.dest, ["x"])) for _ in range(count)]
            continue
        keep = 0.95 if action.required else (0.25 if action.dest not in ("model", "out", "output") else 0.9)
        if rng.random() > keep:
            continue
        flag = rng.choice(action.option_strings)
        if action.nargs == 0:
            argv.append(flag)
            continue
        values = option_value(rng, action, pools, n)
        if values and rng.random() < 0.05:
            argv.append(f"{flag}={values[0]}")
        else:
            argv += [flag] + values
    roll = rng.random()
    if roll < 0.08:
        argv.insert(rng.randrange(1, len(argv) + 1), rng.choice(["--bogus", "--batch-size", "-x", "--out=", "--"]))
    elif roll < 0.12 and len(argv) > 2:
        del argv[rng.randrange(1, len(argv))]
    elif roll < 0.15 and len(argv) > 2:
        i, j = rng.randrange(1, len(argv)), rng.randrange(1, len(argv))
        argv[i], argv[j] = argv[j], argv[i]
    return argv


# ------------------------------------------------------------------------------------------- running


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def in_process(argv: list[str]) -> tuple[int | None, str, str]:
    """(exit code, stderr, traceback text or '') of one ``valfree.cli.main(argv)`` call."""
    from valfree.cli import main

    err, out = io.StringIO(), io.StringIO()
    code, trace = None, ""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(RUN_SECONDS)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main(argv)
    except SystemExit as exc:  # argparse's own exit (usage errors, --help)
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except _Timeout:
        trace = f"timeout after {RUN_SECONDS} s"
    except BaseException as exc:  # anything else would be a traceback for the user
        import traceback

        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))[-2000:]
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return code, err.getvalue(), trace


def subprocess_env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                PYTHONWARNINGS="ignore")


def as_process(argv: list[str], cwd: Path) -> tuple[int | None, str, str, int]:
    """(exit code, stderr, traceback text or '', peak RSS in KiB) of ``python -m valfree argv``."""
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([sys.executable, "-m", "valfree", *[os.fsencode(a) for a in argv]], cwd=cwd,
                                env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL)
        code, rss = wait_rss(proc, RUN_SECONDS * 2)
        err.seek(0)
        text = err.read().decode("utf-8", "replace")
    if code is None:
        return None, text, f"timeout after {RUN_SECONDS * 2} s", rss
    return code, text, (text if "Traceback" in text else ""), rss


def stderr_problem(code: int | None, err: str) -> str | None:
    """Why this exit code and stderr break the command-line contract, or None."""
    if code not in EXIT_CODES:
        return f"exit code {code!r}"
    if "Traceback" in err:
        return "traceback on stderr"
    if code == 2:
        lines = [ln for ln in err.splitlines() if ln.strip()]
        if len(lines) != 1:
            if usage_block(lines):
                return "usage block"
            return f"{len(lines)} lines on stderr for exit 2"
    return None


def usage_block(lines: list[str]) -> bool:
    """argparse's own error format: a usage paragraph, then one 'error:' line."""
    return bool(lines) and lines[0].startswith("usage:") and lines[-1].count(": error: ") == 1 and \
        not any(": error: " in ln for ln in lines[:-1])


def parser_errors_are_one_line() -> bool:
    """True once argparse's usage errors print one line, as ValfreeErrors do."""
    code, err, _ = in_process(["select", "--bogus-flag-for-the-check"])
    return code == 2 and len([ln for ln in err.splitlines() if ln.strip()]) == 1


# ------------------------------------------------------------------------------------ store checks


def csv_rows(out: Path) -> list[dict]:
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        return list(csv.DictReader(fh))


def store_problem(out: Path, expected: list[str]) -> str | None:
    """None when the CSV holds exactly one ok row per expected checkpoint, and nothing else."""
    if not out.exists():
        return "no CSV"
    rows = csv_rows(out)
    paths = Counter(os.path.realpath(r["path"]) for r in rows)
    dup = [p for p, c in paths.items() if c > 1]
    want = {os.path.realpath(p) for p in expected}
    lost = sorted(want - set(paths))
    extra = sorted(set(paths) - want)
    bad = [r["path"] for r in rows if r.get("status") != "ok" or not math.isfinite(float(r.get("grad_norm") or "nan"))]
    if dup or lost or extra or bad:
        return f"duplicated {len(dup)}, lost {len(lost)}, extra {len(extra)}, not ok {len(bad)} of {len(rows)} rows"
    return None


def score_cmd(fx: dict, out: Path, sources: list[str]) -> list[str]:
    r = fx["root"]
    return [sys.executable, "-m", "valfree", "score", *sources, "--model", f"{r}/factory_mod.py:make",
            "--data", f"npz:{r}/data.npz", "--batch-size", "32", "--out", str(out)]


def reaped(proc: subprocess.Popen) -> bool:
    """Whether the child has exited; reaps it with wait4 (never Popen.poll) so its peak RSS is kept."""
    if hasattr(proc, "peak_rss_kb"):
        return True
    pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    if not pid:
        return False
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc.peak_rss_kb = usage.ru_maxrss
    return True


def wait_rss(proc: subprocess.Popen, timeout: float) -> tuple[int | None, int]:
    """Exit code and peak RSS (KiB) of a child, killing it after ``timeout`` seconds (exit code None)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if reaped(proc):
            return proc.returncode, proc.peak_rss_kb
        time.sleep(0.02)
    proc.kill()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.peak_rss_kb = usage.ru_maxrss
    return None, usage.ru_maxrss


def concurrent_round(rng: random.Random, fx: dict, work: Path, i: int) -> dict:
    out = work / f"concurrent_{i}.csv"
    paths = fx["many_paths"]
    halves = rng.random() < 0.5
    if halves:
        cut = rng.randrange(1, len(paths))
        sources = [paths[:cut], paths[cut:]]
    else:
        sources = [[str(fx["many"])], [str(fx["many"])]]
    t0 = time.monotonic()
    procs = [subprocess.Popen(score_cmd(fx, out, s), env=subprocess_env(), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, cwd=work) for s in sources]
    results = [wait_rss(p, RUN_SECONDS * 3) for p in procs]
    seconds = time.monotonic() - t0
    errs = [p.stderr.read().decode("utf-8", "replace") for p in procs]
    problems = [f"writer exit {c!r}: {e[-300:]}" for (c, _), e in zip(results, errs) if c not in EXIT_CODES or "Traceback" in e]
    if not problems:
        problem = store_problem(out, paths)
        problems += [problem] if problem else []
    return {"kind": "halves" if halves else "same", "codes": [c for c, _ in results], "seconds": seconds,
            "rss_kb": max(r for _, r in results), "problems": problems}


def data_lines(out: Path) -> int:
    try:
        with open(out, "rb") as fh:
            return max(fh.read().count(b"\n") - 1, 0)
    except OSError:
        return 0


def kill_round(rng: random.Random, fx: dict, work: Path, i: int, full_seconds: float) -> dict:
    """Kill a score run at a random time, or once it has written a random number of rows; then rerun."""
    out = work / f"killed_{i}.csv"
    sig = rng.choice([signal.SIGKILL, signal.SIGTERM])
    cmd = score_cmd(fx, out, [str(fx["many"])])
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, cwd=work)
    if rng.random() < 0.3:
        when = f"{rng.uniform(0.2, max(full_seconds, 0.5)):.2f}s"
        time.sleep(float(when[:-1]))
    else:
        rows = rng.randrange(1, len(fx["many_paths"]))
        when = f"row {rows}"
        deadline = time.monotonic() + RUN_SECONDS * 2
        while not reaped(proc) and data_lines(out) < rows and time.monotonic() < deadline:
            time.sleep(0.002)
    if not reaped(proc):
        proc.send_signal(sig)
    code, rss = wait_rss(proc, RUN_SECONDS)
    err = proc.stderr.read().decode("utf-8", "replace")
    problems = [f"killed run printed a traceback: {err[-300:]}"] if "Traceback" in err else []
    rerun = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             stdin=subprocess.DEVNULL, cwd=work)
    code2, rss2 = wait_rss(rerun, RUN_SECONDS * 2)
    err2 = rerun.stderr.read().decode("utf-8", "replace")
    if code2 != 0 or "Traceback" in err2:
        problems.append(f"rerun exit {code2!r}: {err2[-300:]}")
    problem = store_problem(out, fx["many_paths"])
    problems += [problem] if problem else []
    return {"signal": sig.name, "at": when, "code": code, "rss_kb": max(rss, rss2), "problems": problems}


# ------------------------------------------------------------------------------------------------ run


def run(count: int, seed: int, writers: int, kills: int, processes: int, max_rss_mb: float,
        keep: str | None = None, known_usage_block: bool | None = None) -> dict:
    torch.set_num_threads(1)
    rng = random.Random(seed)
    work = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="valfree-cli-fuzz-"))
    work.mkdir(parents=True, exist_ok=True)
    cwd = os.getcwd()
    os.chdir(work)  # default outputs (scores.csv, report.html, pruned.safetensors) land here
    try:
        fx = build_fixtures(work / "fixtures")
        parsers = subcommands()
        names = sorted(parsers)
        if known_usage_block is None:
            known_usage_block = not parser_errors_are_one_line()
        base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        codes, failures, usage_blocks, slowest = Counter(), [], [], 0.0
        per_command, sample_rss = Counter(), 0
        sample = set(rng.sample(range(count), min(processes, count)))
        t_args = time.monotonic()
        ran = 0
        while ran < count:
            n = ran
            name = names[n % len(names)] if n < len(names) else rng.choice(names)
            argv = argument_string(rng, name, parsers[name], fx, n)
            ran += 1
            per_command[name] += 1
            t0 = time.monotonic()
            if ran - 1 in sample:
                code, err, trace, rss = as_process(argv, work)
                sample_rss = max(sample_rss, rss)
            else:
                code, err, trace = in_process(argv)
            slowest = max(slowest, time.monotonic() - t0)
            codes[str(code)] += 1
            problem = trace and ("traceback: " + trace.strip().splitlines()[-1]) or stderr_problem(code, err)
            if problem == "usage block" and known_usage_block:
                usage_blocks.append(argv)
                continue
            if problem:
                failures.append({"argv": [a.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                                          for a in argv], "problem": problem, "stderr": err.strip()[-400:]})
        arg_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        arg_seconds = time.monotonic() - t_args
        rounds = [concurrent_round(rng, fx, work, i) for i in range(writers)]
        # A kill by time lands within about one run's length (the writers' time is the best guess).
        full_seconds = max([r["seconds"] for r in rounds] or [5.0])
        killed = [kill_round(rng, fx, work, i, full_seconds) for i in range(kills)]
        for r in rounds + killed:
            failures += [{"round": {k: v for k, v in r.items() if k != "problems"}, "problem": p} for p in r["problems"]]
        child_rss = max([r["rss_kb"] for r in rounds + killed] + [sample_rss])
        payload_ran = (fx["root"] / "PAYLOAD_RAN").exists()
        peak_growth = (arg_rss - base_rss) / 1024
        return {
            "count": count, "seed": seed, "per_command": dict(per_command), "exit_codes": dict(codes),
            "subprocess_sample": len(sample), "concurrent_rounds": [r["kind"] for r in rounds],
            "kill_rounds": [f"{r['signal']} at {r['at']}" for r in killed], "writers_seconds": round(full_seconds, 1),
            "failures": failures, "tracebacks": sum("traceback" in str(f["problem"]) for f in failures),
            "payload_ran": payload_ran,
            "usage_block_known": len(usage_blocks),
            "peak_rss_mb": round(arg_rss / 1024, 1), "peak_growth_mb": round(peak_growth, 1),
            "child_peak_rss_mb": round(child_rss / 1024, 1), "max_rss_mb": max_rss_mb,
            "slowest_run_s": round(slowest, 2), "argument_strings_s": round(arg_seconds, 1),
        }
    finally:
        os.chdir(cwd)
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="argument strings")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writers", type=int, default=2, help="rounds of two concurrent score processes")
    parser.add_argument("--kills", type=int, default=2, help="rounds of a killed score run and its rerun")
    parser.add_argument("--processes", type=int, default=3, help="argument strings also run as real processes")
    parser.add_argument("--max-rss-mb", type=float, default=1500.0,
                        help="bound on any process's peak resident memory (the fuzzer's own and every child's)")
    parser.add_argument("--keep", default=None, help="keep every generated file under this folder")
    args = parser.parse_args(argv)
    t0 = time.monotonic()
    result = run(args.count, args.seed, args.writers, args.kills, args.processes, args.max_rss_mb, args.keep)
    result["wall_s"] = round(time.monotonic() - t0, 1)
    over = max(result["peak_rss_mb"], result["child_peak_rss_mb"]) > args.max_rss_mb
    print(json.dumps(result))
    return 1 if result["failures"] or result["payload_ran"] or over else 0


if __name__ == "__main__":
    sys.exit(main())
