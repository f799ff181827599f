"""`valfree score` on a finished Hugging Face Trainer run: its checkpoint-N/ folders, with the Trainer's
own dataset of dicts (input_ids, attention_mask, labels) as the data spec. transformers is imported
inside the tests because importing it takes seconds."""

from __future__ import annotations

import csv

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from valfree import head_gradient  # noqa: E402
from valfree.batches import collate, input_of  # noqa: E402
from valfree.cli import main  # noqa: E402
from valfree.io.data import probe_batch, seeded_indices  # noqa: E402

from .hf_trainer_data import dataset, tiny_bert  # noqa: E402

DATA = "tests.commands.hf_trainer_data:dataset"


@pytest.fixture(scope="module")
def trainer_run(tmp_path_factory):
    from transformers import Trainer, TrainingArguments

    out = tmp_path_factory.mktemp("hf") / "run"
    args = TrainingArguments(str(out), max_steps=6, save_steps=2, save_strategy="steps", eval_strategy="no",
                             per_device_train_batch_size=8, learning_rate=1e-2, report_to=[], use_cpu=True,
                             disable_tqdm=True, seed=0, logging_strategy="no")
    Trainer(model=tiny_bert(), args=args, train_dataset=dataset("train")).train()
    return out


def test_score_reads_the_trainers_checkpoints_with_its_dict_dataset(trainer_run, tmp_path):
    from transformers import AutoModelForSequenceClassification

    folders = sorted(trainer_run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert [p.name for p in folders] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    out = tmp_path / "scores.csv"
    assert main(["score", str(trainer_run), "--data", DATA, "--out", str(out)]) == 0
    with open(out, newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [r["status"] for r in table] == ["ok"] * 3
    assert [int(r["step"]) for r in table] == [2, 4, 6]

    # By hand: the same seeded items, collated as the Trainer collates them, fed as keyword arguments.
    ds = dataset("train")
    batch = collate([ds[int(i)] for i in seeded_indices(ds, 256, 0)])
    assert set(batch) == {"input_ids", "attention_mask", "labels"} and (batch["attention_mask"] == 0).any()
    x, y = probe_batch(ds, 256, 0)
    assert set(x) == {"input_ids", "attention_mask"} and (y == batch["labels"]).all()
    for row, folder in zip(table, folders):
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        expected = head_gradient(model, input_of(batch), batch["labels"], head="classifier")
        assert float(row["grad_norm"]) == pytest.approx(expected.grad_norm, rel=1e-6)
        assert float(row["loss"]) == pytest.approx(expected.loss, rel=1e-6)
    # The attention mask reaches the model: without it the padded positions change the features.
    model = AutoModelForSequenceClassification.from_pretrained(folders[-1])
    unmasked = head_gradient(model, batch["input_ids"], batch["labels"], head="classifier")
    assert unmasked.grad_norm != pytest.approx(float(table[-1]["grad_norm"]), rel=1e-4)
