import pytest
import torch
from torch import nn

import valfree
from valfree.models import FAMILIES


@pytest.mark.parametrize("family,expected", [("mlp", "fc"), ("cnn", "fc"), ("resnet", "fc"), ("vit", "head")])
def test_reference_models(family, expected):
    assert valfree.find_head(FAMILIES[family]()).name == expected


def test_common_names_and_nested_containers():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.backbone = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8))
            self.classifier = nn.Sequential(nn.Dropout(), nn.Linear(8, 3))

        def forward(self, x):
            return self.classifier(self.backbone(x))

    assert valfree.find_head(Net()).name == "classifier.1"


def test_heads_dot_head_and_explicit_name():
    class ViTLike(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Linear(4, 4)
            self.heads = nn.Sequential()
            self.heads.add_module("head", nn.Linear(4, 3))

        def forward(self, x):
            return self.heads(self.encoder(x))

    m = ViTLike()
    assert valfree.find_head(m).name == "heads.head"
    assert valfree.find_head(m, head="encoder").name == "encoder"
    assert valfree.find_head(m, head=m.encoder).name == "encoder"


def test_ambiguous_heads_list_candidates():
    class Distilled(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)
            self.classifier = nn.Linear(4, 3)

    with pytest.raises(valfree.ValfreeError, match=r"several modules.*'head'.*'classifier'|several modules.*'classifier'.*'head'"):
        valfree.find_head(Distilled())


def test_no_head_and_bad_name():
    with pytest.raises(valfree.ValfreeError, match="no nn.Linear or 1x1 convolution"):
        valfree.find_head(nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU()))
    with pytest.raises(valfree.ValfreeError, match="no module named 'nope'.*'2'"):
        valfree.find_head(nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2)), head="nope")
    with pytest.raises(valfree.ValfreeError, match="not a per-location linear map"):
        valfree.find_head(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(2, 2)), head="0")


def test_1x1_conv_is_a_head_but_3x3_is_not():
    m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 5, 1))
    assert valfree.find_head(m).name == "2"


def test_head_not_called_in_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 2)
            self.other = nn.Linear(3, 2)

        def forward(self, x):
            return self.other(x)

    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])
    # Traced, the layer that produces the output wins over the name; named by hand, fc is never called.
    assert valfree.find_head(Net(), inputs=x).name == "other"
    with pytest.raises(valfree.ValfreeError, match="was not called"):
        valfree.head_gradient(Net(), x, y, head="fc")
