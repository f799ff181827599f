"""One reading of data items and batches for every layer: inputs, labels, and moving to a device."""

import pytest
import torch

import valfree
from valfree import ValfreeError
from valfree.io.data import split_sample
from valfree.integrations.lightning import default_targets
from valfree.batches import (
    batch_size_of,
    collate,
    concat,
    forward,
    input_of,
    label_of,
    logits_of,
    move_to,
    pad_token_id,
    split_batch,
    take,
)


@pytest.mark.parametrize("item, inputs, labels", [
    ((1, 2, 3), 1, 2),
    ([1], 1, None),
    ({"pixel_values": 1, "labels": 2}, 1, 2),
    ({"x": 1, "y": 0}, 1, 0),  # a label of 0 is a label, not a missing one
    ({"image": 1}, 1, None),
    ("raw", "raw", None),
])
def test_inputs_and_labels_of_each_form(item, inputs, labels):
    assert input_of(item) == inputs
    assert label_of(item) == labels
    assert split_sample(item) == (inputs, -1 if labels is None else labels)


def test_a_dict_without_inputs_names_its_keys():
    with pytest.raises(ValfreeError, match=r"keys \['sentence', 'y'\]"):
        input_of({"sentence": "text is no input", "y": 2})


def test_training_callbacks_read_the_same_label_keys():
    assert default_targets({"input_ids": 1, "target": 4}) == 4
    with pytest.raises(ValfreeError, match="targets_from_batch"):
        default_targets({"input_ids": 1})


def test_move_to_casts_floating_tensors_only_and_keeps_the_structure():
    batch = {"x": torch.zeros(2, dtype=torch.float32), "ids": [torch.ones(2, dtype=torch.long), "text"]}
    moved = move_to(batch, "cpu", torch.float64)
    assert moved["x"].dtype == torch.float64
    assert moved["ids"][0].dtype == torch.long and moved["ids"][1] == "text"
    assert isinstance(moved["ids"], list)


# ---- Hugging Face data as it comes: dicts of keyword inputs ----

def test_a_dict_of_several_inputs_is_keyword_inputs_without_labels_or_text():
    item = {"input_ids": [5, 6], "attention_mask": [1, 1], "labels": 1, "sentence": "a b", "idx": 3}
    assert input_of(item) == {"input_ids": [5, 6], "attention_mask": [1, 1], "idx": 3}
    assert label_of(item) == 1
    # Text columns beside one conventional input drop out, leaving that input itself (positional).
    assert input_of({"image": 1, "path": "a.png", "label": 0}) == 1
    assert input_of({"pixel_values": 1, "pixel_mask": 2, "labels": 0}) == {"pixel_values": 1, "pixel_mask": 2}


def test_collate_pads_token_sequences_like_the_trainer():
    items = [{"input_ids": [5, 6, 7], "labels": 1, "sentence": "a b c"},
             {"input_ids": [8], "labels": 0, "sentence": "d"}]
    batch = collate(items, pad_token_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]  # added, since padding happened
    assert batch["labels"].tolist() == [1, 0] and batch["sentence"] == ["a b c", "d"]
    tokens = collate([{"input_ids": torch.tensor([1, 2]), "attention_mask": torch.tensor([1, 1]), "labels": [3, 4]},
                      {"input_ids": torch.tensor([1]), "attention_mask": torch.tensor([1]), "labels": [3]}])
    assert tokens["attention_mask"].tolist() == [[1, 1], [1, 0]]
    assert tokens["labels"].tolist() == [[3, 4], [3, -100]]  # per-token labels padded with the ignored index


def test_collate_keeps_tuples_and_tensors_and_names_what_differs():
    x, y = collate([(torch.zeros(2), 1), (torch.ones(2), 0)])
    assert x.shape == (2, 2) and y.tolist() == [1, 0]
    assert collate([torch.zeros(3), torch.ones(3)]).shape == (2, 3)
    with pytest.raises(ValfreeError, match="item 1 has keys"):
        collate([{"x": 1}, {"y": 1}])
    with pytest.raises(ValfreeError, match="'pixel_values' entries have shapes"):
        collate([{"pixel_values": torch.zeros(3, 4, 4)}, {"pixel_values": torch.zeros(3, 5, 5)}])


def test_take_and_batch_size_keep_the_form():
    batch = {"input_ids": torch.arange(6).reshape(3, 2), "sentence": ["a", "b", "c"], "labels": torch.tensor([0, 1, 2])}
    part = take(batch, torch.tensor([2, 0]))
    assert part["input_ids"].tolist() == [[4, 5], [0, 1]] and part["sentence"] == ["c", "a"]
    assert batch_size_of(batch) == 3 and batch_size_of((torch.zeros(5, 2), None)) == 5
    assert take((torch.arange(4), torch.arange(4) * 2), slice(1, 3))[1].tolist() == [2, 4]


def test_forward_passes_what_the_model_takes_by_name():
    class Net(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None):
            return input_ids * (1 if attention_mask is None else attention_mask)

    class Plain(torch.nn.Module):
        def forward(self, x):
            return x + 1

    ids, mask = torch.tensor([[2, 3]]), torch.tensor([[1, 0]])
    assert forward(Net(), {"input_ids": ids, "attention_mask": mask, "idx": 7}).tolist() == [[2, 0]]
    assert forward(Plain(), {"image": ids, "idx": torch.tensor([7])}).tolist() == [[3, 4]]  # the lone input, positionally
    with pytest.raises(ValfreeError, match=r"none of which Plain.forward\(x\) takes"):
        forward(Plain(), {"input_ids": ids, "attention_mask": mask})
    transformers = pytest.importorskip("transformers")
    encoding = transformers.BatchEncoding({"input_ids": ids, "attention_mask": mask})  # a UserDict, not a dict
    assert forward(Net(), encoding).tolist() == [[2, 0]]
    assert isinstance(move_to(encoding, "cpu"), dict) and input_of(encoding) == dict(encoding)


def _tiny_bert(transformers, pad_token_id=0):
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=3,
                                     pad_token_id=pad_token_id)
    return transformers.BertForSequenceClassification(config).double().eval()


def _token_dataset():
    """A tokenized dataset as the Trainer gets it: unpadded dict items with labels and a text column."""
    g = torch.Generator().manual_seed(1)
    lengths = [7, 3, 5, 7, 2, 6]
    return [{"input_ids": torch.randint(1, 30, (n,), generator=g).tolist(), "token_type_ids": [0] * n,
             "attention_mask": [1] * n, "labels": i % 3, "sentence": "w " * n} for i, n in enumerate(lengths)]


def test_the_probe_on_a_dict_batch_is_the_probe_of_the_masked_model():
    transformers = pytest.importorskip("transformers")
    model = _tiny_bert(transformers)
    batch = collate(_token_dataset(), pad_token_id=pad_token_id(model))
    inputs, labels = split_batch(batch)
    assert sorted(inputs) == ["attention_mask", "input_ids", "token_type_ids"]
    probe = valfree.head_gradient(model, inputs, labels)

    # By hand: the same batch as keyword arguments, and the head's gradient from autograd on HF's own loss.
    ids, mask = batch["input_ids"], batch["attention_mask"]
    by_hand = valfree.head_gradient(model, {"input_ids": ids, "attention_mask": mask}, labels)
    out = model(input_ids=ids, attention_mask=mask, labels=labels)
    model.zero_grad()
    out.loss.backward()
    grad = model.classifier.weight.grad
    assert probe.grad_norm == pytest.approx(by_hand.grad_norm, rel=1e-12, abs=0)
    assert probe.grad_norm == pytest.approx(float(grad.norm()), rel=1e-10)
    assert probe.loss == pytest.approx(float(out.loss.detach()), rel=1e-10)
    assert probe.bias_grad_norm == pytest.approx(float(model.classifier.bias.grad.norm()), rel=1e-10)
    assert probe.batch_size == 6

    # The mask matters: without it the padded examples attend to their padding.
    unmasked = valfree.head_gradient(model, {"input_ids": ids, "token_type_ids": batch["token_type_ids"]}, labels)
    assert abs(unmasked.grad_norm - probe.grad_norm) > 1e-6 * probe.grad_norm


def test_the_probe_takes_a_collated_dataloader_batch_with_labels_inside():
    transformers = pytest.importorskip("transformers")
    model = _tiny_bert(transformers)
    loader = torch.utils.data.DataLoader(_token_dataset(), batch_size=6, collate_fn=collate)
    batch = next(iter(loader))
    full = valfree.head_gradient(model, input_of(batch), label_of(batch))
    # A whole HF batch (labels inside) is fed as keyword arguments too; the traced head ignores the loss entry.
    assert valfree.find_head(model, inputs=batch).name == "classifier"
    assert valfree.head_gradient(model, batch, label_of(batch)).grad_norm == pytest.approx(full.grad_norm, rel=1e-12)


def test_concat_joins_loader_batches_of_different_lengths():
    a = {"input_ids": torch.tensor([[1, 2, 3]]), "attention_mask": torch.tensor([[1, 1, 1]]), "labels": torch.tensor([0]),
         "sentence": ["x y z"]}
    b = {"input_ids": torch.tensor([[4], [5]]), "attention_mask": torch.tensor([[1], [1]]), "labels": torch.tensor([1, 2]),
         "sentence": ["u", "v"]}
    joined = concat([a, b], pad_token_id=7)
    assert joined["input_ids"].tolist() == [[1, 2, 3], [4, 7, 7], [5, 7, 7]]
    assert joined["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0], [1, 0, 0]]
    assert joined["labels"].tolist() == [0, 1, 2] and joined["sentence"] == ["x y z", "u", "v"]
    x, y = concat([(torch.zeros(2, 3), torch.tensor([0, 1])), [torch.ones(1, 3), torch.tensor([2])]])
    assert x.shape == (3, 3) and y.tolist() == [0, 1, 2]
    with pytest.raises(ValfreeError, match="cannot join"):
        concat([torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 5, 5)])


def test_logits_of_reads_what_models_return():
    logits, loss = torch.zeros(2, 3), torch.tensor(1.0)
    assert logits_of(logits) is logits
    assert logits_of({"loss": loss, "logits": logits}) is logits
    assert logits_of((None, [logits, loss])) is logits
    assert logits_of({"embedding": loss, "scores": logits}) is loss  # no logits entry: the first tensor
    assert logits_of("text") is None


def test_the_pad_token_is_read_from_the_model_or_the_model_it_wraps():
    from types import SimpleNamespace

    class Wrapper(torch.nn.Module):  # a LightningModule or DDP wrapper holding a transformers model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    hf_like = torch.nn.Linear(2, 2)
    hf_like.config = SimpleNamespace(pad_token_id=5)
    assert pad_token_id(hf_like) == 5 and pad_token_id(Wrapper(hf_like)) == 5
    hf_like.config = SimpleNamespace(pad_token_id=None)  # GPT-2 and others leave it unset
    assert pad_token_id(Wrapper(hf_like)) == 0
    assert pad_token_id(torch.nn.Linear(2, 2)) == 0 and pad_token_id(None) == 0
