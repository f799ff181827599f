"""Hugging Face: LabelFreeCallback in a real Trainer, eval_strategy="no", on a tiny random BERT.

transformers (and accelerate, which its Trainer needs) form the ``huggingface`` extra that ``make test``
installs; they are imported inside the tests because importing them takes seconds.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from contextlib import redirect_stdout

import pytest
import torch
from torch.utils.data import Dataset

import valfree
from valfree import head_gradient
from valfree.cli import main as cli_main
from valfree.errors import ValfreeError
from valfree.io.checkpoints import load_state_dict
from valfree.selection.rules import DEFAULT_RULE, select_by_rule

from .test_monitor import reference_stop_step

VOCAB, LENGTH = 100, 12


class CountingTask(Dataset):
    """Token sequences; the label says whether most tokens come from the lower half of the vocabulary.
    Token 4 is noise that flips 15 % of the labels, so the small training set gets overfitted."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(5, VOCAB, (n, LENGTH), generator=g)
        labels = ((self.ids < 52).sum(1) > LENGTH // 2).long()
        flip = torch.rand(n, generator=g) < 0.15
        self.labels = torch.where(flip, 1 - labels, labels)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones(LENGTH, dtype=torch.long), "labels": self.labels[i]}

    def batch(self) -> dict:
        return {"input_ids": self.ids, "attention_mask": torch.ones_like(self.ids), "labels": self.labels}


def tiny_bert(dropout: float = 0.1):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, num_labels=2,
                        hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    torch.manual_seed(0)
    return BertForSequenceClassification(config)


def trainer_for(tmp_path, callback, model=None, **overrides):
    from transformers import Trainer, TrainingArguments

    settings = dict(eval_strategy="no", save_strategy="steps", save_steps=4, max_steps=24, learning_rate=1e-2,
                    per_device_train_batch_size=16, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                    logging_steps=4)
    settings.update(overrides)
    args = TrainingArguments(str(tmp_path / "run"), **settings)
    callbacks = callback if isinstance(callback, list) else [callback]
    return Trainer(model=model or tiny_bert(), args=args, train_dataset=CountingTask(32, seed=1), callbacks=callbacks)


def probe_entries(log_history):
    return [e for e in log_history if "valfree/grad_norm" in e]


def test_best_checkpoint_is_recorded_loaded_and_agrees_with_valfree_select(tmp_path):
    probe = CountingTask(64, seed=2).batch()
    trainer = trainer_for(tmp_path, valfree.huggingface.LabelFreeCallback(probe))
    trainer.train()
    run = tmp_path / "run"
    entries = probe_entries(trainer.state.log_history)
    steps, values = [e["step"] for e in entries], [e["valfree/grad_norm"] for e in entries]
    assert steps == [4, 8, 12, 16, 20, 24]
    assert [e["valfree/checkpoint"] for e in entries] == [f"checkpoint-{s}" for s in steps]

    # The default rule, on the columns the callback logged, as `valfree select` reads them.
    columns = {c: [e.get(f"valfree/{c}", math.nan) for e in entries] for c in ("grad_norm", "pred_change", "label_agreement", "pred_subset")}
    assert all(v == 64 for v in columns["pred_subset"][1:])
    chosen = select_by_rule(DEFAULT_RULE, steps, columns)
    chosen_index = steps.index(chosen.step)
    best_dir = run / f"checkpoint-{chosen.step:.0f}"
    assert trainer.state.best_model_checkpoint == str(best_dir)
    saved_state = json.loads((run / "checkpoint-24" / "trainer_state.json").read_text())
    assert saved_state["best_global_step"] == chosen.step
    assert saved_state["best_model_checkpoint"] == str(best_dir)
    assert json.dumps(probe_entries(saved_state["log_history"]), sort_keys=True) == json.dumps(entries, sort_keys=True)  # the score is in trainer_state.json

    # The best model was loaded at the end: its weights, and the probe value recorded for it.
    best_weights = load_state_dict(best_dir)
    model_state = trainer.model.state_dict()
    assert all(torch.equal(model_state[k], v) for k, v in best_weights.items())
    assert chosen.step != 24 and not torch.equal(load_state_dict(run / "checkpoint-24")["classifier.weight"],
                                                 model_state["classifier.weight"])
    labels = probe.pop("labels")
    assert head_gradient(trainer.model, probe, labels).grad_norm == pytest.approx(values[chosen_index], rel=1e-5)

    out = io.StringIO()
    with redirect_stdout(out):
        cli_main(["select", str(run)])
    assert out.getvalue().strip().splitlines()[-1] == str(best_dir)


def test_early_stopping_ends_training_by_the_rule(tmp_path):
    probe = CountingTask(64, seed=2).batch()
    callback = valfree.huggingface.LabelFreeCallback(probe, patience=2, min_delta=0.01, rule="probe", warmup=0)
    trainer = trainer_for(tmp_path, callback, save_steps=2, max_steps=60)
    trainer.train()
    entries = probe_entries(trainer.state.log_history)
    steps, values = [e["step"] for e in entries], [e["valfree/grad_norm"] for e in entries]
    assert trainer.state.global_step < 60
    assert reference_stop_step(steps, values, patience=2, min_delta=0.01, span=3) == trainer.state.global_step


def test_piggyback_reads_the_training_step_before_the_update(tmp_path):
    """No dropout, so the training forward equals the train-mode probe of the same batch."""
    model = tiny_bert(dropout=0.0)
    seen = []

    def remember(module, args, kwargs):
        if module.training:
            seen.append(({k: v.detach().clone() for k, v in module.state_dict().items()},
                         {k: v.clone() for k, v in kwargs.items()}))

    model.register_forward_pre_hook(remember, with_kwargs=True)
    callback = valfree.huggingface.LabelFreeCallback(piggyback=True)
    trainer_for(tmp_path, callback, model=model, max_steps=8).train()
    assert callback.tracker.steps == [4, 8]
    reference = tiny_bert(dropout=0.0)
    for step, value in zip(callback.tracker.steps, callback.tracker.values):
        weights, inputs = seen[step - 1]  # one forward per optimizer step
        reference.load_state_dict(weights)
        labels = inputs.pop("labels")
        assert value == pytest.approx(head_gradient(reference, inputs, labels, train_mode=True).grad_norm, rel=1e-5)


def test_resume_rebuilds_the_series_from_the_log_history(tmp_path):
    probe = CountingTask(64, seed=2).batch()
    first = valfree.huggingface.LabelFreeCallback(probe)
    trainer_for(tmp_path, first, max_steps=12).train()
    resumed = valfree.huggingface.LabelFreeCallback(probe)
    trainer = trainer_for(tmp_path, resumed, max_steps=16)
    trainer.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-12"))
    assert resumed.tracker.steps == [4, 8, 12, 16]
    assert resumed.tracker.values[:3] == first.tracker.values


def test_settings_that_would_fight_the_callback_are_refused(tmp_path):
    probe = CountingTask(16, seed=2).batch()
    with pytest.raises(ValfreeError, match="save_strategy is 'no'"):
        trainer_for(tmp_path, valfree.huggingface.LabelFreeCallback(probe), save_strategy="no").train()
    with pytest.raises(ValfreeError, match="not both"):
        valfree.huggingface.LabelFreeCallback(probe, piggyback=True)


class ScalarWriter:
    """Stands for TensorBoard's SummaryWriter (tensorboard is not installed here): keeps the scalars."""

    def __init__(self):
        self.scalars: list[tuple[str, float, int]] = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))

    def add_text(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass

    def steps_of(self, tag: str) -> list[int]:
        return [step for t, _, step in self.scalars if t == tag]


def tensorboard_with(writer):
    """transformers' own TensorBoardCallback, given the writer it would otherwise build."""
    from transformers.integrations import TensorBoardCallback

    board = TensorBoardCallback.__new__(TensorBoardCallback)  # its __init__ only checks that tensorboard is installed
    board._SummaryWriter, board.tb_writer, board.logging_dir = None, writer, None
    return board


def test_attached_the_scores_reach_the_reporters_at_check_steps_only(tmp_path):
    writer = ScalarWriter()
    trainer = trainer_for(tmp_path, tensorboard_with(writer), max_steps=12, logging_steps=3)
    callback = valfree.huggingface.LabelFreeCallback(CountingTask(32, seed=2).batch()).attach(trainer)
    order = [type(cb).__name__ for cb in trainer.callback_handler.callbacks]
    assert order.index("DefaultFlowCallback") < order.index("LabelFreeCallback") < order.index("TensorBoardCallback")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.train()
    assert not [w for w in caught if "LabelFreeCallback" in str(w.message)]
    assert writer.steps_of("train/valfree/grad_norm") == callback.tracker.steps == [4, 8, 12]
    logged = {step: value for tag, value, step in writer.scalars if tag == "train/valfree/grad_norm"}
    assert [logged[s] for s in callback.tracker.steps] == pytest.approx(callback.tracker.values)
    assert {3, 6, 9} <= set(writer.steps_of("train/loss"))  # the Trainer's own logs, between the checks


def test_given_through_callbacks_it_works_and_warns_that_the_reporters_miss_the_scores(tmp_path):
    writer = ScalarWriter()
    callback = valfree.huggingface.LabelFreeCallback(CountingTask(32, seed=2).batch())
    trainer = trainer_for(tmp_path, [tensorboard_with(writer), callback], max_steps=8)
    trainer.args.report_to = ["tensorboard"]  # as a Trainer building its own TensorBoardCallback has it
    with pytest.warns(UserWarning, match=r"LabelFreeCallback\(\.\.\.\)\.attach\(trainer\)"):
        trainer.train()
    assert callback.tracker.steps == [4, 8] and len(probe_entries(trainer.state.log_history)) == 2
    assert trainer.state.best_model_checkpoint is not None
    assert writer.steps_of("train/loss") and not writer.steps_of("train/valfree/grad_norm")  # it ran first



def test_the_drawn_prediction_subset_is_budgeted_against_the_training_between_saves():
    from types import SimpleNamespace

    from valfree.integrations.huggingface import _trained_per_save

    args = SimpleNamespace(per_device_train_batch_size=32, gradient_accumulation_steps=2, world_size=2,
                           save_strategy="steps", save_steps=500)
    assert _trained_per_save(args, SimpleNamespace(save_steps=500), None) == 500 * 32 * 2 * 2
    per_epoch = SimpleNamespace(**{**vars(args), "save_strategy": "epoch"})
    assert _trained_per_save(per_epoch, SimpleNamespace(save_steps=0), SimpleNamespace(dataset=list(range(60000)))) == 60000
    assert _trained_per_save(per_epoch, SimpleNamespace(save_steps=0), object()) is None
