"""``valfree prune --out`` on a model that takes ``input_ids`` and ``attention_mask`` by name, with a
dataset of dicts: the saved file loads and takes the same keywords; a model torch.export cannot capture
gets one sentence, exit code 2, and the table is still printed."""

from pathlib import Path

import torch

from valfree import prune
from valfree.cli import main
from valfree.pruning import load_pruned

from .hf_trainer_data import dataset
from .prune_text_models import token_classifier, unexportable_classifier

MODELS = Path(__file__).with_name("prune_text_models.py")
DATA = "tests.commands.hf_trainer_data:dataset"


def test_prune_saves_a_keyword_input_model_that_loads_back(tmp_path, capsys):
    checkpoint, out = tmp_path / "model.pt", tmp_path / "pruned.safetensors"
    torch.save(token_classifier().state_dict(), checkpoint)
    code = main(["prune", str(checkpoint), "--model", f"{MODELS}:token_classifier", "--data", DATA,
                 "--criterion", "jbr", "--confidence", "0", "--ratio", "0.5", "--steps", "1",
                 "--calibration-size", "32", "-o", str(out)])
    assert code == 0 and f"wrote {out}" in capsys.readouterr().out
    library = prune(token_classifier(), dataset(), "jbr", ratio=0.5, steps=1, confidence=0.0, calibration_size=32)
    assert library.model.fc1.out_features < 32
    ds = dataset("test")
    loaded = load_pruned(out)
    for batch, length in ((1, 10), (16, 7)):
        ids, mask = ds.ids[:batch, :length], ds.mask[:batch, :length]
        with torch.no_grad():  # same ATen operators on the same weights: equal to float32 rounding
            torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask),
                                       library.model(input_ids=ids, attention_mask=mask), rtol=0, atol=1e-6)


def test_prune_says_in_one_sentence_when_the_model_cannot_be_saved(tmp_path, capsys):
    checkpoint, out = tmp_path / "model.pt", tmp_path / "pruned.safetensors"
    torch.save(unexportable_classifier().state_dict(), checkpoint)
    code = main(["prune", str(checkpoint), "--model", f"{MODELS}:unexportable_classifier", "--data", DATA,
                 "--criterion", "l1", "--ratio", "0.5", "--steps", "1", "--calibration-size", "32", "-o", str(out)])
    captured = capsys.readouterr()
    assert code == 2
    assert "torch.export cannot capture the pruned model" in captured.err and "Traceback" not in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "params kept" in captured.out and "removed" in captured.out  # the pruning's table is not lost
    assert not out.exists()
