"""One reading of data items and batches for every layer: inputs, labels, and moving to a device."""

import pytest
import torch

from valfree import ValfreeError
from valfree.io.data import split_sample
from valfree.integrations.lightning import default_targets
from valfree.probes.batches import input_of, label_of, move_to


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
    with pytest.raises(ValfreeError, match=r"keys \['mask', 'y'\]"):
        input_of({"mask": 1, "y": 2})


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
