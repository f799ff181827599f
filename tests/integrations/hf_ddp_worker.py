"""One rank of a two-process Hugging Face Trainer run with LabelFreeCallback, started by torchrun.

``python -m torch.distributed.run --standalone --nproc-per-node 2 tests/integrations/hf_ddp_worker.py OUT MODE``
with MODE ``fixed`` (the fixed probe batch, sharded across the ranks) or ``piggyback``. Each rank writes
what it decided to ``OUT/rank<R>.json``; the test compares the ranks and recomputes the probes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import valfree.huggingface  # noqa: E402
from tests.integrations.test_huggingface import CountingTask, tiny_bert  # noqa: E402

PATIENCE, MIN_DELTA = 2, 0.01


def main(out: Path, mode: str) -> None:
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(1)
    if mode == "fixed":
        callback = valfree.huggingface.LabelFreeCallback(CountingTask(64, seed=2).batch(), patience=PATIENCE,
                                                         min_delta=MIN_DELTA, rule="probe", warmup=0)
    else:
        # Only the training forwards: no prediction-change subset, whose eval forwards carry no labels.
        callback = valfree.huggingface.LabelFreeCallback(piggyback=True, pred_subset=0)
    args = TrainingArguments(
        str(out / "run"), eval_strategy="no", save_strategy="steps", save_steps=2, max_steps=40 if mode == "fixed" else 8,
        learning_rate=1e-2, per_device_train_batch_size=8, report_to=[], use_cpu=True, ddp_backend="gloo",
        disable_tqdm=True, seed=0, logging_steps=2,
    )
    model = tiny_bert(dropout=0.0)
    # This rank's own share of each training forward, so that the test can rebuild the global batch.
    seen = []
    if mode == "piggyback":
        labels = {}
        model.register_forward_pre_hook(lambda m, a, kw: labels.update(y=kw["labels"]), with_kwargs=True)
        model.classifier.register_forward_hook(lambda m, i, o: seen.append(
            {"features": i[0].tolist(), "logits": o.tolist(), "labels": labels["y"].tolist()}) if m.training else None)
    trainer = Trainer(model=model, args=args, train_dataset=CountingTask(64, seed=1), callbacks=[callback])
    trainer.train()
    state = trainer.state
    (out / f"rank{args.process_index}.json").write_text(json.dumps({
        "world_size": args.world_size,
        "steps": callback.tracker.steps,
        "values": callback.tracker.values,
        "global_step": state.global_step,
        "best_model_checkpoint": state.best_model_checkpoint,
        "classifier": model.classifier.weight.detach().flatten().tolist(),
        "forwards": seen,
    }))
    # The Trainer leaves its gloo process group open; torn down by interpreter exit instead, a rank
    # now and then aborted ("terminate called without an active exception") after all its work.
    import torch.distributed as dist

    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
