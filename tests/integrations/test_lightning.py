"""Lightning: LabelFreeCheckpoint and LabelFreeEarlyStopping in a real Trainer, with no validation loop."""

from __future__ import annotations

import copy
import csv
import math

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import valfree
from valfree import head_gradient, select_checkpoint
from valfree.errors import ValfreeError

from .test_monitor import blobs, reference_kept, reference_stop_step

# Lightning is an extra (``make test`` installs it). It is imported inside the tests, not at collection,
# because importing it takes seconds.


def lightning():
    import lightning.pytorch as pl

    return pl


def classifier_class():
    from .lightning_models import Classifier

    return Classifier


NOISE = 5.0  # hard enough that the small training set is overfitted and the probe turns back up


def loader(n: int = 96, seed: int = 1) -> DataLoader:
    return DataLoader(TensorDataset(*blobs(n, seed, noise=NOISE)), batch_size=32, shuffle=False)


def make_trainer(tmp_path, callbacks, **kwargs):
    from lightning.pytorch.loggers import CSVLogger

    return lightning().Trainer(
        accelerator="cpu", devices=1, callbacks=callbacks, logger=CSVLogger(tmp_path, name="logs"),
        enable_progress_bar=False, enable_model_summary=False, deterministic=True, log_every_n_steps=1, **kwargs,
    )


def new_model(seed: int = 0):
    lightning().seed_everything(seed, verbose=False)
    return classifier_class()()


def test_fit_without_validation_keeps_top_k_stops_by_rule_and_tests_the_best(tmp_path):
    LabelFreeCheckpoint, LabelFreeEarlyStopping = valfree.lightning.LabelFreeCheckpoint, valfree.lightning.LabelFreeEarlyStopping

    probe = blobs(64, seed=7, noise=NOISE)
    ckpt = LabelFreeCheckpoint(probe, dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=2, tail=0.5,
                               results=tmp_path / "scores.csv", rule="probe", load_best_at_end=False)
    stop = LabelFreeEarlyStopping(probe, every_n_train_steps=2, patience=2, min_delta=0.02, rule="probe", warmup=0)
    trainer = make_trainer(tmp_path, [ckpt, stop], max_steps=200)
    model = new_model()
    trainer.fit(model, train_dataloaders=loader())
    assert trainer.checkpoint_callback is ckpt

    # Stopping happened, by the rule, at the step the rule names.
    steps, values = ckpt.tracker.steps, ckpt.tracker.values
    assert stop.tracker.values == values  # both callbacks probed the same batch at the same steps
    assert trainer.global_step < 200 and stop.stopped_step == trainer.global_step
    assert reference_stop_step(steps, values, patience=2, min_delta=0.02, span=3) == trainer.global_step

    # Exactly save_top_k files are left: the rule's choice and the next best smoothed score among the
    # files retention kept during training.
    on_disk = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    during = {f"epoch={(s - 1) // 3}-step={s}.ckpt" for s in (steps[i] for i in reference_kept(values, 0.5, 3, 2))}
    chosen = select_checkpoint(steps, values, tail=0.5, ema=3)
    assert len(on_disk) == 2 and set(on_disk) <= during
    assert f"epoch={(chosen.step - 1) // 3:.0f}-step={chosen.step:.0f}.ckpt" in on_disk
    assert ckpt.best_model_path == str(tmp_path / "ckpt" / f"epoch={(chosen.step - 1) // 3:.0f}-step={chosen.step:.0f}.ckpt")
    assert ckpt.best_model_score.item() == pytest.approx(chosen.score)
    assert set(ckpt.best_k_models) == {str(tmp_path / "ckpt" / n) for n in on_disk}

    # Every logger sees the score: the CSV logger's metrics hold each probe at its step.
    with open(trainer.logger.log_dir + "/metrics.csv") as fh:
        logged = {int(r["step"]): float(r["valfree/grad_norm"]) for r in csv.DictReader(fh) if r.get("valfree/grad_norm")}
    # Logged at the check steps, and only there.
    assert sorted(logged) == steps and [logged[s] for s in steps] == pytest.approx(values, rel=1e-6)

    # ckpt_path="best" loads the chosen file, whose weights are not the final ones.
    final = copy.deepcopy(model.state_dict())
    trainer.test(model, dataloaders=loader(64, seed=11), ckpt_path="best", verbose=False)
    assert trainer.ckpt_path == ckpt.best_model_path
    saved = torch.load(ckpt.best_model_path, weights_only=True)["state_dict"]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in saved.items())
    assert chosen.step != trainer.global_step and not torch.equal(final["net.fc.weight"], saved["net.fc.weight"])
    # The recorded probe is the probe of the checkpoint that was saved.
    assert head_gradient(model, *probe).grad_norm == pytest.approx(values[chosen.index], rel=1e-6)


def test_resumed_fit_restores_both_callbacks_and_continues_as_one_run(tmp_path):
    LabelFreeCheckpoint, LabelFreeEarlyStopping = valfree.lightning.LabelFreeCheckpoint, valfree.lightning.LabelFreeEarlyStopping

    probe = blobs(64, seed=7, noise=NOISE)

    def callbacks(folder):
        return [LabelFreeCheckpoint(probe, dirpath=folder, save_top_k=2, tail=1.0, save_last=True),
                LabelFreeEarlyStopping(probe, patience=50)]

    class SeeRestoredState(lightning().Callback):
        def on_train_start(self, trainer, pl_module):
            self.states = {type(cb).__name__: copy.deepcopy(cb.state_dict()) for cb in trainer.callbacks if hasattr(cb, "tracker")}

    whole = callbacks(tmp_path / "whole")
    make_trainer(tmp_path, whole, max_epochs=6).fit(new_model(), train_dataloaders=loader())

    first = callbacks(tmp_path / "part")
    make_trainer(tmp_path, first, max_epochs=3).fit(new_model(), train_dataloaders=loader())
    # The state restored is the one the resumed checkpoint holds (the file names itself as the last one).
    stored = torch.load(first[0].last_model_path, weights_only=True)["callbacks"]
    second, seen = callbacks(tmp_path / "part"), SeeRestoredState()
    make_trainer(tmp_path, [*second, seen], max_epochs=6).fit(
        new_model(seed=123), train_dataloaders=loader(), ckpt_path=first[0].last_model_path
    )
    def nan_free(value):
        if isinstance(value, dict):
            return {k: nan_free(v) for k, v in value.items()}
        if isinstance(value, list):
            return [nan_free(v) for v in value]
        return "nan" if isinstance(value, float) and math.isnan(value) else value

    def run_length_apart(state):  # the resumed fit is longer, so it expects more checks
        state = nan_free(copy.deepcopy(state))
        state["tracker"]["rules"]["expected_checks"] = None
        return state

    assert {k: run_length_apart(v) for k, v in seen.states.items()} == {
        "LabelFreeCheckpoint": run_length_apart(stored[first[0].state_key]),
        "LabelFreeEarlyStopping": run_length_apart(stored[first[1].state_key])}
    for got, want in zip(second, whole):
        assert got.tracker.steps == want.tracker.steps == [3, 6, 9, 12, 15, 18]
        assert got.tracker.values == pytest.approx(want.tracker.values, rel=1e-6)
    assert second[1].wait_count == whole[1].wait_count and second[1].best_score == pytest.approx(whole[1].best_score)
    names = lambda cb: [p.rsplit("/", 1)[-1] for p in cb.tracker.kept_paths]
    assert names(second[0]) == names(whole[0])
    assert second[0].best_model_path.rsplit("/", 1)[-1] == whole[0].best_model_path.rsplit("/", 1)[-1]


def test_piggyback_checkpoint_scores_the_training_batch(tmp_path):
    LabelFreeCheckpoint = valfree.lightning.LabelFreeCheckpoint
    pl = lightning()

    class Record(pl.Callback):
        expected: dict = {}

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # The probe of this batch in train mode, on the weights before this step's update.
            x, y = batch
            self.expected[trainer.global_step + 1] = head_gradient(copy.deepcopy(pl_module), x, y, train_mode=True).grad_norm

    record = Record()
    ckpt = LabelFreeCheckpoint(piggyback=True, every_n_train_steps=2, save_top_k=0)
    make_trainer(tmp_path, [record, ckpt], max_steps=8).fit(new_model(), train_dataloaders=loader())
    assert ckpt.tracker.steps == [2, 4, 6, 8]
    assert ckpt.tracker.values == pytest.approx([record.expected[s] for s in ckpt.tracker.steps], rel=1e-5)
    assert not list((tmp_path).glob("**/*.ckpt"))  # save_top_k=0 saves nothing


def test_bad_settings_are_one_clear_error():
    LabelFreeCheckpoint, LabelFreeEarlyStopping = valfree.lightning.LabelFreeCheckpoint, valfree.lightning.LabelFreeEarlyStopping

    with pytest.raises(ValfreeError, match="not both"):
        LabelFreeCheckpoint(blobs(8, seed=1), piggyback=True)
    with pytest.raises(ValfreeError, match="not both"):
        LabelFreeEarlyStopping(piggyback=True, every_n_train_steps=2, every_n_epochs=1)
    with pytest.raises(ValfreeError, match="must contain"):
        LabelFreeCheckpoint(piggyback=True, filename="last")
    assert math.isfinite(LabelFreeEarlyStopping(piggyback=True).patience)


def test_the_drawn_prediction_subset_is_budgeted_against_the_training_between_checks():
    from types import SimpleNamespace

    from valfree.integrations.lightning_checks import _ProbeSchedule, _trained_per_check
    from valfree.integrations.prediction_tracking import training_pred_subset

    trainer = SimpleNamespace(train_dataloader=SimpleNamespace(batch_size=128), accumulate_grad_batches=2,
                              num_training_batches=469, world_size=4)
    # every 100 optimizer steps of 2 accumulated batches of 128 on 4 ranks; or one epoch of 469 batches per rank
    assert _trained_per_check(trainer, _ProbeSchedule(100, None)) == 100 * 2 * 128 * 4
    assert _trained_per_check(trainer, _ProbeSchedule(None, 2)) == 2 * 469 * 128 * 4
    assert _trained_per_check(SimpleNamespace(train_dataloader=None), _ProbeSchedule(None, 1)) is None
    # 2 % of the inputs trained on between checks, between 256 and 2048 items
    assert training_pred_subset(469 * 128) == 1200
    assert training_pred_subset(100 * 128) == 256 and training_pred_subset(None) == 256
    assert training_pred_subset(10**6) == 2048
