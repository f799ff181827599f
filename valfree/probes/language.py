"""The head-gradient probe for language models: ``lm_head`` with per-token next-token cross-entropy.

Every predicted token is a sample. Position i's hidden state predicts token i + 1, so the features
and logits of the last position and the first token's label drop out (the shift that Hugging Face
models apply to ``labels``); positions whose next token is padding (``attention_mask`` 0) or whose
label is ``ignore_index`` are not samples.

**Memory and cost.** The logits are N x V for N tokens and a vocabulary of V. The Gram form costs
N^2 (V + d) and holds two N x N matrices; the direct form R^T Z costs N V d and holds the V x d
gradient. valfree picks the cheaper (``path="auto"``). On the direct path the residual is formed
``chunk_tokens`` rows at a time and R^T Z accumulated, so the extra memory is a few chunk x V
buffers plus V x d, not several N x V copies: for V = 50257, d = 768 and N = 4096 tokens in float32,
one N x V buffer is 0.82 GB while a 1024-token chunk is 0.21 GB. :func:`lm_probe_memory` gives the
estimate for given shapes.

**Tied embeddings.** GPT-2 and many LMs share ``lm_head.weight`` with the input embedding. The probe
then reports ``tied=True``: ``grad_norm`` is still the gradient through the head's use of the matrix
(the embedding's own use is a different path), and ``weight_norm``/``score_w`` are the shared
matrix's norm, i.e. the embedding's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ValfreeError
from .forward import capture_forward
from .head_gradient import HeadGradient, gram_is_cheaper, residual, weight_grad_norm_sq
from .heads import find_head
from .readouts import softmax_readouts
from .rows import NON_FINITE_LOGITS

DEFAULT_CHUNK_BYTES = 256 * 2**20


@dataclass
class LMHeadGradient(HeadGradient):
    """A :class:`HeadGradient` over tokens, with ``tied`` (head weight shared with the input embedding)
    and ``vocab_size``."""

    tied: bool = False
    vocab_size: int = 0


def input_embedding_weight(model: nn.Module) -> torch.Tensor | None:
    """The input-embedding matrix: ``get_input_embeddings()`` (transformers) or the first nn.Embedding."""
    getter = getattr(model, "get_input_embeddings", None)
    if callable(getter):
        try:
            emb = getter()
        except (NotImplementedError, AttributeError):
            emb = None
        if emb is not None and getattr(emb, "weight", None) is not None:
            return emb.weight
    for m in model.modules():
        if isinstance(m, nn.Embedding):
            return m.weight
    return None


def is_tied(head_weight: torch.Tensor, embedding_weight: torch.Tensor | None) -> bool:
    """True when the head weight is the embedding's tensor or views the same storage."""
    if embedding_weight is None:
        return False
    if head_weight is embedding_weight:
        return True
    return (
        head_weight.shape == embedding_weight.shape
        and head_weight.device == embedding_weight.device
        and head_weight.data_ptr() == embedding_weight.data_ptr()
    )


def lm_probe_memory(n_tokens: int, vocab: int, d: int, bytes_per_value: int = 4, chunk_tokens: int | None = None) -> dict:
    """Estimated extra bytes of each path (beyond the model's own N x V logits) and the auto choice.

    Gram: R (N x V) plus two N x N Gram matrices. Direct, chunked: about four chunk x V buffers
    (logits in the compute dtype, log-probabilities, one-hot, residual) plus the V x d product.
    """
    chunk = min(n_tokens, chunk_tokens or default_chunk(vocab, bytes_per_value))
    return {
        "gram_bytes": (n_tokens * vocab + 2 * n_tokens**2) * bytes_per_value,
        "direct_bytes": (4 * chunk * vocab + vocab * d) * bytes_per_value,
        "chunk_tokens": chunk,
        "auto_path": "gram" if gram_is_cheaper(n_tokens, vocab, d) else "direct",
    }


def default_chunk(vocab: int, bytes_per_value: int = 4) -> int:
    return max(1, DEFAULT_CHUNK_BYTES // (4 * vocab * bytes_per_value))


def shifted_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    labels: torch.Tensor | None = None, ignore_index: int = -100) -> torch.Tensor:
    """Next-token targets (B, T-1): ``labels`` (or ``input_ids``) shifted left, padding set to ignore_index."""
    source = input_ids if labels is None else labels
    t = source[:, 1:].clone().long()
    if attention_mask is not None:
        t[attention_mask[:, 1:] == 0] = ignore_index
    return t


def lm_head_gradient_from_features(
    features: torch.Tensor,
    logits: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    path: str = "auto",
    chunk_tokens: int | None = None,
    tied: bool = False,
) -> LMHeadGradient:
    """The probe from already aligned rows: ``features`` (..., d), ``logits`` (..., V), ``targets`` (...).

    No shift is applied here (see :func:`shifted_targets`); rows with ``ignore_index`` are dropped.
    """
    z = features.detach().reshape(-1, features.shape[-1])
    a = logits.detach().reshape(-1, logits.shape[-1])
    t = targets.reshape(-1).to(a.device).long()
    if t.shape[0] != a.shape[0]:
        raise ValfreeError(f"the LM probe has {a.shape[0]} token positions but {t.shape[0]} targets.")
    compute_dtype = torch.float32 if a.dtype in (torch.float16, torch.bfloat16) else a.dtype
    keep = (t != ignore_index).nonzero().squeeze(1)
    n, vocab, d = int(keep.numel()), a.shape[1], z.shape[1]
    if n == 0:
        raise ValfreeError("every next-token target is padding or ignore_index, so there is nothing to probe.")
    if path == "auto":
        path = "gram" if gram_is_cheaper(n, vocab, d) else "direct"
    chunk = n if path == "gram" else min(n, chunk_tokens or default_chunk(vocab, torch.finfo(compute_dtype).bits // 8))
    grad = torch.zeros(vocab, d, dtype=compute_dtype, device=a.device) if path == "direct" else None
    bias_grad = torch.zeros(vocab, dtype=compute_dtype, device=a.device)
    loss_sum, sq_feat, norm_sq = 0.0, 0.0, None
    reads = {"entropy": 0.0, "confidence": 0.0, "margin": 0.0}
    for start in range(0, n, chunk):
        rows = keep[start:start + chunk]
        a_c, z_c, t_c = a[rows].to(compute_dtype), z[rows].to(compute_dtype), t[rows]
        if not torch.isfinite(a_c).all():
            raise ValfreeError(NON_FINITE_LOGITS)
        # residual() divides by the chunk's size; rescale so that the chunks add up to the mean over all n.
        r, value = residual(a_c, t_c, "ce", ignore_index=ignore_index)
        share = len(rows) / n
        r = r * share
        loss_sum += float(value) * share
        sq_feat += float(z_c.square().sum())
        bias_grad += r.sum(0)
        for key, v in softmax_readouts(a_c).items():
            reads[key] += v * share
        if path == "gram":
            norm_sq, _ = weight_grad_norm_sq(r, z_c, "gram")
        else:
            grad.addmm_(r.T, z_c)
    if path == "direct":
        norm_sq = grad.square().sum()
    elif path != "gram":
        raise ValfreeError(f"unknown path {path!r}; use 'auto', 'gram' or 'direct'.")
    grad_norm = float(norm_sq.clamp_min(0).sqrt())
    weight_norm = float(weight.detach().to(compute_dtype).norm())
    feature_rms = (sq_feat / n) ** 0.5
    warnings = []
    if tied:
        warnings.append(
            "the head weight is tied to the input embedding: weight_norm and score_w use the shared matrix, and "
            "grad_norm is the gradient through the head's use of it only"
        )
    return LMHeadGradient.from_norms(
        grad_norm,
        weight_norm,
        feature_rms,
        bias_grad_norm=float(bias_grad.norm()) if bias is not None else 0.0,
        loss=loss_sum,
        batch_size=n,
        path=path,
        warnings=warnings,
        tied=tied,
        vocab_size=vocab,
        **reads,
    )


def lm_head_gradient(
    model: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    head: str | nn.Module | None = None,
    ignore_index: int = -100,
    path: str = "auto",
    chunk_tokens: int | None = None,
) -> LMHeadGradient:
    """Probe a causal LM on a batch of sequences (B, T): next-token CE through ``lm_head`` alone.

    The model is called as ``model(input_ids=..., attention_mask=...)`` (the mask only when given).
    ``labels`` (B, T), in Hugging Face's unshifted convention with ``ignore_index`` for masked
    positions, replace ``input_ids`` as the source of the targets.
    """
    if input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValfreeError(f"input_ids must be integer token ids of shape (batch, length), got {tuple(input_ids.shape)} {input_ids.dtype}.")
    if input_ids.shape[1] < 2:
        raise ValfreeError("sequences need at least 2 tokens for a next-token target.")
    targets = shifted_targets(input_ids, attention_mask, labels, ignore_index)
    if not (targets != ignore_index).any():  # before the forward pass, which may be expensive
        raise ValfreeError("every next-token target is padding or ignore_index, so there is nothing to probe.")
    found = find_head(model, "lm_head" if head is None and hasattr(model, "lm_head") else head)
    kwargs = {"input_ids": input_ids}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    (cap,) = capture_forward(model, kwargs, [found])
    if cap.logits.dim() != 3 or cap.logits.shape[:2] != input_ids.shape:
        raise ValfreeError(
            f"the head {found.name!r} outputs shape {tuple(cap.logits.shape)}, not (batch, length, vocab) for "
            f"input_ids of shape {tuple(input_ids.shape)}; pass head='name' with the LM head."
        )
    return lm_head_gradient_from_features(
        cap.features[:, :-1], cap.logits[:, :-1], targets, found.weight, found.bias,
        ignore_index=ignore_index, path=path, chunk_tokens=chunk_tokens,
        tied=is_tied(found.weight, input_embedding_weight(model)),
    )
