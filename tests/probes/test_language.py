"""The language-model probe: shift, padding, tied embeddings, chunked direct and Gram paths, against
autograd through a standalone copy of the head on the detached final hidden states (float64)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import valfree
from valfree.probes import lm_head_gradient, lm_head_gradient_from_features, lm_probe_memory



def tiny_gpt2(tied=True, vocab=40):
    transformers = pytest.importorskip("transformers")  # the 'huggingface' extra; the dev env has it
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=vocab, n_positions=16, n_embd=12, n_layer=1, n_head=2,
                                     tie_word_embeddings=tied)
    return transformers.GPT2LMHeadModel(config).double().eval()


def reference(model, ids, mask=None):
    """||dL/dW|| and L of next-token CE through a copy of lm_head on detached final hidden states."""
    with torch.no_grad():
        h = model.transformer(input_ids=ids, attention_mask=mask).last_hidden_state
    head = nn.Linear(h.shape[-1], model.config.vocab_size, bias=False)
    head.weight.data = model.lm_head.weight.detach().clone()
    labels = ids[:, 1:].clone()
    if mask is not None:
        labels[mask[:, 1:] == 0] = -100
    loss = F.cross_entropy(head(h[:, :-1]).reshape(-1, head.out_features), labels.reshape(-1), ignore_index=-100)
    loss.backward()
    return head.weight.grad.norm().item(), loss.item(), int((labels != -100).sum())


@pytest.mark.parametrize("path,chunk", [("auto", None), ("gram", None), ("direct", None), ("direct", 5)])
def test_gpt2_probe_matches_autograd_on_every_path(path, chunk):
    model = tiny_gpt2()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 40, (3, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # right padding
    ref_norm, ref_loss, n = reference(model, ids, mask)
    got = lm_head_gradient(model, ids, mask, path=path, chunk_tokens=chunk)
    assert got.grad_norm == pytest.approx(ref_norm, rel=1e-9)
    assert got.loss == pytest.approx(ref_loss, rel=1e-9)
    assert got.batch_size == n == 3 * 8 - 3
    assert got.tied and got.vocab_size == 40
    assert got.weight_norm == pytest.approx(model.transformer.wte.weight.norm().item(), rel=1e-12)
    assert "tied to the input embedding" in got.warnings[0]
    assert all(p.grad is None for p in model.parameters())


def test_untied_head_is_reported_untied():
    model = tiny_gpt2(tied=False)
    ids = torch.randint(0, 40, (2, 6), generator=torch.Generator().manual_seed(2))
    got = lm_head_gradient(model, ids)
    assert not got.tied and not got.warnings
    assert got.grad_norm == pytest.approx(reference(model, ids)[0], rel=1e-9)


class TinyLM(nn.Module):
    """A plain torch LM with a biased head tied by assignment (no transformers)."""

    def __init__(self, vocab=11, d=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab)
        self.lm_head.weight = self.embed.weight

    def forward(self, input_ids):
        return self.lm_head(torch.tanh(self.mix(self.embed(input_ids))))


def test_plain_torch_tied_lm_with_bias_matches_autograd_and_chunking_agrees():
    torch.manual_seed(3)
    model = TinyLM()
    ids = torch.randint(0, 11, (4, 7), generator=torch.Generator().manual_seed(3))
    whole = lm_head_gradient(model, ids, path="direct")
    chunked = lm_head_gradient(model, ids, path="direct", chunk_tokens=4)
    gram = lm_head_gradient(model, ids, path="gram")
    feats = torch.tanh(model.mix(model.embed(ids))).detach()[:, :-1]
    head = nn.Linear(4, 11)
    head.load_state_dict({"weight": model.lm_head.weight.detach(), "bias": model.lm_head.bias.detach()})
    F.cross_entropy(head(feats).reshape(-1, 11), ids[:, 1:].reshape(-1)).backward()
    for got in (whole, chunked, gram):
        assert got.tied
        assert got.grad_norm == pytest.approx(head.weight.grad.norm().item(), rel=1e-9)
        assert got.bias_grad_norm == pytest.approx(head.bias.grad.norm().item(), rel=1e-9)
    assert chunked.entropy == pytest.approx(whole.entropy, rel=1e-9)


def test_from_features_drops_ignored_tokens():
    g = torch.Generator().manual_seed(4)
    z, w = torch.randn(2, 5, 3, generator=g), torch.randn(7, 3, generator=g)
    t = torch.randint(0, 7, (2, 5), generator=g)
    t[0, 2] = -100
    got = lm_head_gradient_from_features(z, z @ w.T, t, w, chunk_tokens=3)
    keep = t.reshape(-1) != -100
    r = (torch.softmax(z.reshape(-1, 3)[keep] @ w.T, 1) - F.one_hot(t.reshape(-1)[keep], 7)) / int(keep.sum())
    assert got.grad_norm == pytest.approx((r.T @ z.reshape(-1, 3)[keep]).norm().item(), rel=1e-9)
    assert got.batch_size == 9


def test_memory_estimate_picks_direct_for_a_gpt2_sized_batch():
    est = lm_probe_memory(4096, 50257, 768)
    assert est["auto_path"] == "direct"
    assert est["gram_bytes"] == (4096 * 50257 + 2 * 4096**2) * 4
    assert est["direct_bytes"] < 4096 * 50257 * 4  # chunked: less than one N x V buffer
    assert lm_probe_memory(64, 50257, 768)["auto_path"] == "gram"


def test_bad_inputs_are_clear_errors():
    model = TinyLM()
    with pytest.raises(valfree.ValfreeError, match="input_ids must be integer token ids"):
        lm_head_gradient(model, torch.randn(2, 5))
    with pytest.raises(valfree.ValfreeError, match="at least 2 tokens"):
        lm_head_gradient(model, torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(valfree.ValfreeError, match="every next-token target is padding"):
        lm_head_gradient(model, torch.zeros(2, 3, dtype=torch.long), torch.tensor([[1, 0, 0], [1, 0, 0]]))
