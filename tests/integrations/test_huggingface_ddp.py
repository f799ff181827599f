"""Hugging Face Trainer under DDP: two gloo ranks on CPU, started by torchrun, with LabelFreeCallback.

The ranks must record the probe of the *global* probe batch (each rank holds half of it), make the
same save and stop decisions, and end with the same best model loaded; ``valfree select`` on the
output folder must agree with them.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch

from valfree import head_gradient, head_gradient_from_features, select_checkpoint
from valfree.cli import main as cli_main
from valfree.io.checkpoints import load_state_dict

from .hf_ddp_worker import MIN_DELTA, PATIENCE
from .test_huggingface import CountingTask, tiny_bert
from .test_monitor import reference_stop_step

ROOT = Path(__file__).resolve().parents[2]


def run_two_ranks(out: Path, mode: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(ROOT / "tests" / "integrations" / "hf_ddp_worker.py"), str(out), mode],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def fixed_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("hf_ddp_fixed")
    return out, run_two_ranks(out, "fixed")


def test_ranks_record_the_global_probe_and_decide_alike(fixed_run):
    out, ranks = fixed_run
    assert [r["world_size"] for r in ranks] == [2, 2]
    first, second = ranks
    assert first == second  # steps, values, stop step, best checkpoint and final weights
    run = out / "run"
    steps, values = first["steps"], first["values"]
    assert steps == list(range(2, first["global_step"] + 1, 2))

    # Each recorded value is the single-process probe of the whole 64-example batch on the checkpoint
    # saved at that step, although each rank only ever ran its own 32 examples.
    probe = CountingTask(64, seed=2).batch()
    labels = probe.pop("labels")
    model = tiny_bert(dropout=0.0)
    for step, value in zip(steps, values):
        model.load_state_dict(load_state_dict(run / f"checkpoint-{step}"), strict=False)
        assert value == pytest.approx(head_gradient(model, probe, labels).grad_norm, rel=1e-5), step

    # Both ranks stopped at the step the early-stopping rule gives for the recorded series.
    assert first["global_step"] < 40
    assert reference_stop_step(steps, values, patience=PATIENCE, min_delta=MIN_DELTA, span=3) == first["global_step"]

    # The best checkpoint is the selection rule's, both ranks loaded it, and `valfree select` agrees.
    chosen = select_checkpoint(steps, values)
    best_dir = run / f"checkpoint-{chosen.step:.0f}"
    assert first["best_model_checkpoint"] == str(best_dir)
    assert first["classifier"] == pytest.approx(load_state_dict(best_dir)["classifier.weight"].flatten().tolist())
    text = io.StringIO()
    with redirect_stdout(text):
        assert cli_main(["select", str(run)]) == 0
    assert text.getvalue().strip().splitlines()[-1] == str(best_dir)


def test_piggyback_ranks_record_the_probe_of_the_global_training_batch(tmp_path):
    ranks = run_two_ranks(tmp_path, "piggyback")
    forwards = [r.pop("forwards") for r in ranks]
    assert ranks[0] == ranks[1]
    assert ranks[0]["steps"] == [2, 4, 6, 8]
    classifier = tiny_bert(dropout=0.0).classifier
    for step, value in zip(ranks[0]["steps"], ranks[0]["values"]):
        # The union of the two ranks' micro-batches of that step, probed in one process. grad_norm
        # depends only on the features, logits and labels; the weight passed here only gives shapes.
        parts = [f[step - 1] for f in forwards]
        z = torch.tensor([row for part in parts for row in part["features"]])
        a = torch.tensor([row for part in parts for row in part["logits"]])
        y = torch.tensor([v for part in parts for v in part["labels"]])
        want = head_gradient_from_features(z, a, y, classifier.weight).grad_norm
        assert value == pytest.approx(want, rel=1e-5), step
