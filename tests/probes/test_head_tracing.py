"""Head discovery by tracing: the linear layer whose output becomes the model's output, in one forward pass."""

import pytest
import torch
from torch import nn

import valfree
from valfree.probes.heads import traced_heads


def traced(model: nn.Module, inputs) -> str:
    """The head find_head traces, asserting that it took one forward pass of the model (none when the
    model holds a single linear layer, which needs no tracing)."""
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    try:
        name = valfree.find_head(model, inputs=inputs).name
    finally:
        handle.remove()
    assert len(calls) == (1 if sum(valfree.probes.is_linear_head(m) for m in model.modules()) > 1 else 0)
    return name


# ---- models built from transformers configs (tiny, never downloaded) ----

def _ids(vocab: int, batch: int = 3, length: int = 6) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[0, -2:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def test_bert_sequence_classifier():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=24, max_position_embeddings=16, num_labels=3)
    model = transformers.BertForSequenceClassification(config)
    # BERT holds 14 linear layers (attention, intermediate, output, pooler) before its classifier.
    assert len([m for m in model.modules() if isinstance(m, nn.Linear)]) > 10
    assert traced(model, _ids(40)) == "classifier"


def test_vit_image_classifier():
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=2,
                                    num_attention_heads=2, intermediate_size=24, num_labels=4)
    model = transformers.ViTForImageClassification(config)
    assert traced(model, {"pixel_values": torch.randn(2, 3, 8, 8)}) == "classifier"
    assert traced(model, torch.randn(2, 3, 8, 8)) == "classifier"  # a bare tensor, positionally


def _gpt2_config(transformers, **extra):
    # GPT-2's attention and MLP layers are transformers' Conv1D, not linear heads: the head is the one
    # nn.Linear, which find_head takes without a pass, so the trace is checked on its own as well.
    return transformers.GPT2Config(vocab_size=40, n_positions=16, n_embd=16, n_layer=2, n_head=2, bos_token_id=1,
                                   eos_token_id=1, **extra)


def test_gpt2_sequence_classifier_picks_score_through_the_last_token_index():
    transformers = pytest.importorskip("transformers")
    # GPT-2 scores every token, then indexes each sequence's last real token: an indexing, shape-only.
    model = transformers.GPT2ForSequenceClassification(_gpt2_config(transformers, num_labels=3, pad_token_id=0))
    assert traced(model, _ids(40)) == "score"
    assert traced_heads(model, _ids(40)) == ["score"]


def test_gpt2_lm_head_with_tied_embeddings():
    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(_gpt2_config(transformers))
    assert model.lm_head.weight is model.transformer.wte.weight  # tied to the input embedding
    assert traced(model, _ids(40)) == "lm_head"
    assert traced_heads(model, _ids(40)) == ["lm_head"]
    assert traced_heads(model, _ids(40)["input_ids"]) == ["lm_head"]


# ---- plain torch models ----

class BlockMLP(nn.Module):
    """The residual MLP of the bug report: blocks.N.fc inside, out at the end."""

    def __init__(self, d=8, classes=3):
        super().__init__()
        self.blocks = nn.ModuleList()
        for _ in range(2):
            block = nn.Module()
            block.fc = nn.Linear(d, d)
            self.blocks.append(block)
        self.out = nn.Linear(d, classes)

    def forward(self, x):
        for block in self.blocks:
            x = x + torch.relu(block.fc(x))
        return self.out(x)


def test_residual_mlp_with_inner_fc_layers():
    model = BlockMLP()
    assert traced(model, torch.randn(4, 8)) == "out"
    # Without a batch to trace, the layers inside numbered blocks do not count as named heads either.
    assert valfree.find_head(model).name == "out"


def test_ambiguous_names_without_inputs_list_the_real_candidates():
    class TwoHeads(BlockMLP):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(8, 3)
            self.classifier = nn.Linear(8, 3)
            self.final = nn.Linear(8, 3)

        def forward(self, x):
            return self.final(x)

    model = TwoHeads()
    with pytest.raises(valfree.ValfreeError, match=r"'head', 'classifier'.*last linear layer.*'final'.*inputs="):
        valfree.find_head(model)
    assert traced(model, torch.randn(4, 8)) == "final"


class Mixer(nn.Module):
    """MLP-Mixer: token-mixing linears act across patches (on a transposed view), channel-mixing linears
    across features; the head follows mean pooling over patches."""

    def __init__(self, patches=4, d=8, classes=3, depth=2):
        super().__init__()
        self.stem = nn.Conv2d(1, d, kernel_size=4, stride=4)
        self.layers = nn.ModuleList()
        for _ in range(depth):
            layer = nn.Module()
            layer.norm1, layer.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
            layer.token_fc1, layer.token_fc2 = nn.Linear(patches, 16), nn.Linear(16, patches)
            layer.channel_fc1, layer.channel_fc2 = nn.Linear(d, 16), nn.Linear(16, d)
            self.layers.append(layer)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, images):
        x = self.stem(images).flatten(2).transpose(1, 2)  # (B, patches, d)
        for layer in self.layers:
            y = layer.norm1(x).transpose(1, 2)
            x = x + layer.token_fc2(torch.nn.functional.gelu(layer.token_fc1(y))).transpose(1, 2)
            x = x + layer.channel_fc2(torch.nn.functional.gelu(layer.channel_fc1(layer.norm2(x))))
        return self.head(self.norm(x).mean(1))


def test_mlp_mixer():
    # The last channel-mixing linear's output reaches the output only through a residual sum and a pooling.
    assert traced(Mixer(), torch.randn(2, 1, 8, 8)) == "head"


def test_dict_and_tuple_outputs():
    class DictOut(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 6)
            self.proj = nn.Linear(6, 5)  # an embedding returned beside the logits, registered last
            self.cls = nn.Linear(6, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return {"embedding": self.proj(h), "logits": self.cls(h)}

    class TupleOut(DictOut):
        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.cls(h).flatten(1), self.proj(h)

    assert traced(DictOut(), torch.randn(2, 4)) == "cls"
    assert traced(TupleOut(), torch.randn(2, 4)) == "cls"


def test_shape_only_operations_and_a_separate_bias():
    class Dense(nn.Module):
        """A 1x1 convolution head whose output is permuted, copied and flattened, and a bias added apart."""

        def __init__(self):
            super().__init__()
            self.body = nn.Conv2d(2, 4, 3, padding=1)
            self.classify = nn.Conv2d(4, 3, 1, bias=False)
            self.aux = nn.Linear(3, 3)  # registered after the head, never on the output's path
            self.bias = nn.Parameter(torch.zeros(3))

        def forward(self, x):
            logits = self.classify(torch.relu(self.body(x))).permute(0, 2, 3, 1).contiguous()
            return (logits + self.bias).reshape(-1, 3), self.aux(logits)

    assert traced(Dense(), torch.randn(2, 2, 4, 4)) == "classify"


def test_rescaled_or_mixed_outputs_fall_back_to_names():
    class Tempered(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 4)
            self.fc = nn.Linear(4, 3)
            self.aux = nn.Linear(4, 3)

        def forward(self, x):
            h = torch.relu(self.body(x))
            return self.fc(h) / 2 + self.aux(h)  # neither layer's output reaches the output unchanged

    model = Tempered()
    assert traced_heads(model, torch.randn(2, 4)) == []
    assert traced(model, torch.randn(2, 4)) == "fc"


def test_a_head_applied_twice_is_found_and_then_refused_by_the_probe():
    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.left = nn.Linear(4, 6)
            self.right = nn.Linear(4, 6)
            self.shared = nn.Linear(6, 3)

        def forward(self, x):
            return torch.cat([self.shared(self.left(x)), self.shared(self.right(x))])

    model, x = Siamese(), torch.randn(2, 4)
    assert traced(model, x) == "shared"
    with pytest.raises(valfree.ValfreeError, match="'shared' was called 2 times"):
        valfree.head_gradient(model, x, torch.tensor([0, 1, 2, 0]))


def test_in_place_changes_after_the_head_break_the_trace():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(4, 3)
            self.fc = nn.Linear(4, 3)
            self.out = nn.Linear(3, 3)

        def forward(self, x):
            h = self.fc(x)
            h += self.body(x)  # an activation added in place: h is no longer fc's output
            return self.out(torch.relu(h)).flatten(1)

    assert traced(InPlace(), torch.randn(2, 4)) == "out"


def test_tracing_leaves_the_model_as_it_was_and_is_remembered():
    model = Mixer().train()
    x = torch.randn(2, 1, 8, 8)
    hooks_before = sum(len(m._forward_hooks) for m in model.modules())
    assert traced(model, x) == "head"
    assert model.training and sum(len(m._forward_hooks) for m in model.modules()) == hooks_before
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    assert valfree.find_head(model, inputs=x).name == "head"  # same model, same form of inputs
    assert calls == []


def test_an_explicit_head_wins_over_tracing():
    model = BlockMLP()
    assert valfree.find_head(model, head="blocks.1.fc", inputs=torch.randn(2, 8)).name == "blocks.1.fc"
    assert valfree.find_head(model, head=model.blocks[0].fc, inputs=torch.randn(2, 8)).name == "blocks.0.fc"


def test_the_probe_traces_its_own_batch():
    model = BlockMLP().double()
    x, y = torch.randn(6, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    assert valfree.head_gradient(model, x, y).grad_norm == pytest.approx(
        valfree.head_gradient(model, x, y, head="out").grad_norm, rel=1e-12)


def test_a_model_that_cannot_run_traced_is_found_by_name():
    class Fussy(BlockMLP):
        def forward(self, x):
            if torch._C._is_torch_function_mode_enabled():
                raise RuntimeError("this model refuses to run under a torch function mode")
            return super().forward(x)

    model = Fussy()
    assert valfree.find_head(model, inputs=torch.randn(2, 8)).name == "out"
    assert valfree.head_gradient(model, torch.randn(2, 8), torch.tensor([0, 1])).batch_size == 2


def test_nothing_traced_and_ambiguous_names_say_both():
    class Averaged(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = nn.Linear(4, 3)
            self.classifier = nn.Linear(4, 3)

        def forward(self, x):
            return (self.head(x) + self.classifier(x)) / 2

    with pytest.raises(valfree.ValfreeError, match=r"^no linear layer's output becomes.*several modules.*'head', 'classifier'"):
        valfree.find_head(Averaged(), inputs=torch.randn(2, 4))
