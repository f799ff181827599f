"""The selection rule in training: zero-argument callbacks in a plain loop, Lightning and the HF
Trainer stop by the rule after the warm-up, keep and load the checkpoint at the prediction-change
minimum, and report their scores to a logger.

The runs are scripted (:mod:`tests.integrations.scripted`): their weights are set at each step, so
the Label Wave point is known (the stable stretch, checks 9-12) and the probe alone would choose late.
"""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import valfree
from valfree.errors import ValfreeError
from valfree.integrations.prediction_tracking import DEFAULT_PRED_SUBSET
from valfree.integrations.tracking import DEFAULT_WARMUP
from valfree.selection.rules import select_by_rule

from .scripted import CHECKS, LEARNED_BY, STABLE_UNTIL, OneHotClassifier, make_run

WARMUP_CHECKS = math.ceil(DEFAULT_WARMUP * CHECKS)


def assert_chose_the_wave_point(best):
    assert best.choice.guard_fired and best.choice.wave_step == best.step
    assert LEARNED_BY <= best.step <= STABLE_UNTIL


def test_monitor_zero_argument_stops_by_the_rule_and_restores_the_minimum(tmp_path):
    x, y, weights = make_run()
    model = OneHotClassifier()
    monitor = valfree.Monitor(model, every=1, checkpoint_dir=tmp_path, patience=10, total_steps=CHECKS,
                              results=tmp_path / "scores.csv")
    for step in range(1, CHECKS + 1):
        model.set_check(weights, step)
        monitor.step(step, batch=(x, y))  # the first batch gives the probe and the subset
        if monitor.should_stop():
            break
    assert WARMUP_CHECKS < step < CHECKS
    best = monitor.finish()
    assert_chose_the_wave_point(best)
    assert [p.name for p in tmp_path.glob("*.pt")] == [f"step-{best.step}.pt"]  # save_top_k=1: exactly one file
    model.set_check(weights, CHECKS)
    monitor.load_best()
    assert torch.equal(model.fc.weight, weights[best.step])

    # The CSV carries the columns `valfree select` needs, and the rule agrees on it.
    with open(tmp_path / "scores.csv") as fh:
        rows = list(csv.DictReader(fh))
    columns = {c: [float(r[c]) for r in rows] for c in ("grad_norm", "pred_change", "label_agreement", "pred_subset")}
    assert columns["pred_subset"][1:] == [len(x)] * (len(rows) - 1)
    assert select_by_rule("guarded", [float(r["step"]) for r in rows], columns).step == best.step


def test_monitor_piggybacks_prediction_changes_on_sample_indices(tmp_path):
    x, y, weights = make_run()
    model = OneHotClassifier()
    fixed = valfree.Monitor(model, every=1, total_steps=CHECKS)
    piggy = valfree.Monitor(model, every=1, total_steps=CHECKS)
    ids = torch.arange(len(x))
    for step in range(1, 13):
        model.set_check(weights, step)
        fixed.step(step, batch=(x, y))
        logits = model(x)  # the training forward
        piggy.step(step, batch={"x": x, "labels": y, "index": ids}, output=logits)
        # Every sample is in every batch here, so both ways count the same changes.
        if step > 1:
            assert piggy.last_columns == pytest.approx(fixed.last_columns)


def test_monitor_without_data_says_how_to_give_it():
    with pytest.raises(ValfreeError, match="batch=batch"):
        valfree.Monitor(OneHotClassifier(), every=1).step(1)


def test_default_subset_size_is_a_module_constant():
    assert DEFAULT_PRED_SUBSET == 2048


# ----- Lightning ------------------------------------------------------------------------------------


def scripted_module(weights):
    import lightning.pytorch as pl

    class Scripted(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = OneHotClassifier()

        def forward(self, x):
            return self.net(x)

        def on_train_batch_start(self, batch, batch_idx):
            self.net.set_check(weights, self.trainer.global_step + 1)  # the weights of the check after this step

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.0)

    return Scripted()


def test_lightning_zero_argument_callbacks_stop_by_the_rule_and_load_the_minimum(tmp_path):
    import lightning.pytorch as pl
    from lightning.pytorch.loggers import CSVLogger

    x, y, weights = make_run()
    ckpt, stop = valfree.lightning.LabelFreeCheckpoint(), valfree.lightning.LabelFreeEarlyStopping()
    module = scripted_module(weights)
    forwards = []
    module.net.fc.register_forward_hook(lambda m, i, o: forwards.append(m.training))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=CHECKS, callbacks=[ckpt, stop],
                         logger=CSVLogger(tmp_path, name="logs"), default_root_dir=tmp_path,
                         enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)
    # One batch per epoch: the default check (every epoch) is every step.
    trainer.fit(module, DataLoader(TensorDataset(x, y), batch_size=len(x), shuffle=True))

    steps = ckpt.tracker.steps
    assert stop.tracker.steps == steps and stop.stopped_step == trainer.global_step
    assert WARMUP_CHECKS < trainer.global_step < CHECKS
    # Both callbacks shared one measurement per check: one probe forward and one subset forward (the
    # subset of 200 fits one chunk), besides the training forward.
    assert forwards.count(False) == 2 * len(steps)
    best = ckpt.tracker.best()
    assert_chose_the_wave_point(best)
    # Exactly save_top_k=1 file is left, the chosen one, and its weights are in the module.
    files = list((tmp_path / "logs").glob("**/*.ckpt"))
    assert [str(f) for f in files] == [ckpt.best_model_path] and f"step={best.step}" in ckpt.best_model_path
    assert torch.equal(module.net.fc.weight, weights[best.step])
    # The scores reached the logger at the check steps, and only there.
    with open(trainer.logger.log_dir + "/metrics.csv") as fh:
        logged = [int(r["step"]) for r in csv.DictReader(fh) if r.get("valfree/grad_norm")]
    assert logged == steps
    # The probe data is kept in the state (as training-set indices), so a resumed run probes the same rows.
    state = ckpt.state_dict()["probe_data"]
    assert state["data"]["source"] == "dataset" and len(state["data"]["indices"]) == len(x)


# ----- Hugging Face -----------------------------------------------------------------------------------


class DictData(Dataset):
    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


def hf_trainer(tmp_path, weights, x, y, callbacks):
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class Script(TrainerCallback):
        def on_step_begin(self, args, state, control, model=None, **kwargs):
            model.set_check(weights, state.global_step + 1)

    args = TrainingArguments(str(tmp_path / "run"), eval_strategy="no", save_strategy="steps", save_steps=1,
                             max_steps=CHECKS, learning_rate=0.0, per_device_train_batch_size=len(x), report_to=[],
                             use_cpu=True, disable_tqdm=True, seed=0, logging_steps=100, save_only_model=True)
    return Trainer(model=OneHotClassifier(), args=args, train_dataset=DictData(x, y), callbacks=[Script(), *callbacks])


def test_huggingface_zero_argument_callback_loads_the_minimum_and_reports_to_on_log(tmp_path):
    from transformers import TrainerCallback

    class Recorder(TrainerCallback):  # stands for a reporting integration, which the Trainer runs first
        def __init__(self):
            self.logged = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            if "valfree/grad_norm" in logs:
                self.logged.append(state.global_step)

    x, y, weights = make_run()
    recorder = Recorder()
    recorder.__class__.__module__ = "transformers.integrations.recorder"  # where the Trainer's reporters live
    trainer = hf_trainer(tmp_path, weights, x, y, [recorder])
    callback = valfree.huggingface.LabelFreeCallback().attach(trainer)  # ahead of the reporters
    trainer.train()
    assert trainer.state.global_step == CHECKS  # no patience: it never stops
    steps = callback.tracker.steps
    assert recorder.logged == steps  # every check reached on_log, before the reporter ran
    best = callback.tracker.best()
    assert_chose_the_wave_point(best)
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best.step}")
    assert torch.equal(trainer.model.fc.weight, weights[best.step])


def test_huggingface_stops_by_the_rule_after_the_warmup(tmp_path):
    x, y, weights = make_run()
    callback = valfree.huggingface.LabelFreeCallback(patience=10)
    trainer = hf_trainer(tmp_path, weights, x, y, [callback])
    trainer.train()
    assert WARMUP_CHECKS < trainer.state.global_step < CHECKS
    best = callback.tracker.best()
    assert_chose_the_wave_point(best)
    assert torch.equal(trainer.model.fc.weight, weights[best.step])


def test_lightning_piggyback_probe_still_measures_prediction_changes(tmp_path):
    import lightning.pytorch as pl

    x, y, weights = make_run()
    ckpt = valfree.lightning.LabelFreeCheckpoint(piggyback=True, save_top_k=0, load_best_at_end=False)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=4, callbacks=[ckpt], logger=False,
                         default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(scripted_module(weights), DataLoader(TensorDataset(x, y), batch_size=len(x)))
    assert ckpt.tracker.rules.series["pred_subset"][1:] == [len(x)] * 3
