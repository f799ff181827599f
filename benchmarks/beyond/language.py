"""Language model: a tiny GPT-2 (built from a transformers config, no download); the probe (next-token
CE through ``lm_head``, whose weight is tied to the token embedding) against held-out perplexity.

Two corpora that put the same model and schedule in two regimes:

- ``licenses`` (task ``language``): every distinct file in /usr/share/common-licenses (symlinks
  followed once), about 45k tokens; the last 10 % of every file is held out. 1500 steps of 16 x 64
  tokens are ~38 passes over the 40k training tokens, so the model overfits.
- ``python-stdlib`` (task ``language-stdlib``): the top-level modules of /usr/lib/python3.11, about
  1M tokens; every 10th file (sorted by name) is held out. The same 1500 steps are ~1.7 passes.

Text is split into words and punctuation; the vocabulary is the 1999 most frequent training tokens
plus <unk>. The probe batch is drawn from the training text.

    python -m benchmarks.beyond.run language language-stdlib
"""

from __future__ import annotations

import os
import re
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from valfree.probes.language import lm_head_gradient

from .report import plot_from_json
from .common import CACHE, PROBE_COLUMNS, Timer, set_threads, summarise, train_with_checkpoints, write_result

CORPORA = {"licenses": Path("/usr/share/common-licenses"), "python-stdlib": Path("/usr/lib/python3.11")}
SETTINGS = {"vocab": 2000, "context": 64, "n_embd": 64, "n_layer": 2, "n_head": 2, "steps": 1500,
            "batch_size": 16, "lr": 2e-3, "checkpoints": 20, "probe_sequences": 16, "seed": 0, "heldout_fraction": 0.1}
TOKEN = re.compile(r"\w+|[^\w\s]")


def corpus_tokens(corpus: str = "licenses") -> tuple[list[str], list[str]]:
    root = CORPORA[corpus]
    train, held = [], []
    if corpus == "licenses":
        for f in sorted({os.path.realpath(p) for p in root.iterdir() if p.is_file()}):
            words = TOKEN.findall(Path(f).read_text(errors="replace"))
            cut = int(len(words) * (1 - SETTINGS["heldout_fraction"]))
            train += words[:cut]
            held += words[cut:]
        return train, held
    every = round(1 / SETTINGS["heldout_fraction"])
    for i, f in enumerate(sorted(root.glob("*.py"))):
        (held if i % every == every - 1 else train).extend(TOKEN.findall(f.read_text(errors="replace")))
    return train, held


def encode(train: list[str], held: list[str], vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    itos = ["<unk>"] + [w for w, _ in Counter(train).most_common(vocab - 1)]
    stoi = {w: i for i, w in enumerate(itos)}
    enc = lambda ws: torch.tensor([stoi.get(w, 0) for w in ws], dtype=torch.long)  # noqa: E731
    return enc(train), enc(held)


def windows(ids: torch.Tensor, context: int) -> torch.Tensor:
    """Non-overlapping sequences of ``context`` tokens (the last partial one dropped)."""
    n = len(ids) // context
    return ids[: n * context].reshape(n, context)


def gpt2(vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    s = SETTINGS
    config = GPT2Config(vocab_size=vocab, n_positions=s["context"], n_embd=s["n_embd"], n_layer=s["n_layer"],
                        n_head=s["n_head"], resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True)
    return GPT2LMHeadModel(config)


def lm_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@torch.no_grad()
def heldout_perplexity(model, seqs: torch.Tensor) -> float:
    model.eval()
    nll, count = 0.0, 0
    for i in range(0, len(seqs), 64):
        batch = seqs[i:i + 64]
        n = batch.numel() - len(batch)  # next-token targets
        nll += float(model(input_ids=batch, labels=batch).loss) * n
        count += n
    return float(np.exp(nll / count))


def run(log=print, corpus: str = "licenses") -> dict:
    set_threads()
    s = {**SETTINGS, "corpus": corpus}
    task = "language" if corpus == "licenses" else f"language_{corpus.split('-')[-1]}"
    timer = Timer()
    train_words, held_words = corpus_tokens(corpus)
    train_ids, held_ids = encode(train_words, held_words, s["vocab"])
    # Training draws random windows: every offset, so an epoch is not limited to one tiling of the text.
    starts = torch.arange(0, len(train_ids) - s["context"])
    train_seqs = torch.stack([train_ids[i:i + s["context"]] for i in starts])
    held_seqs = windows(held_ids, s["context"])
    torch.manual_seed(s["seed"])
    model = gpt2(s["vocab"])
    paths = train_with_checkpoints(model, lm_loss, (train_seqs,), s["steps"], s["batch_size"], s["lr"],
                                   s["checkpoints"], CACHE / task, s["seed"], log)
    timer.mark("train_s")
    g = torch.Generator().manual_seed(s["seed"])
    probe_ids = windows(train_ids, s["context"])[torch.randperm(len(train_ids) // s["context"], generator=g)[: s["probe_sequences"]]]
    rows = []
    for step, path in paths:
        model.load_state_dict(torch.load(path, weights_only=True), strict=False)  # lm_head.weight is tied
        model.tie_weights()
        probe = lm_head_gradient(model, probe_ids)
        row = {"step": step, **{c: getattr(probe, c) for c in PROBE_COLUMNS}, "probe_loss": probe.loss,
               "path_used": probe.path, "tokens": probe.batch_size, "tied": probe.tied,
               "heldout_perplexity": heldout_perplexity(model, held_seqs)}
        rows.append(row)
        log(f"step {step}: grad_norm {probe.grad_norm:.4g} held-out ppl {row['heldout_perplexity']:.2f}")
    timer.mark("total_s")
    steps = [r["step"] for r in rows]
    metric = [r["heldout_perplexity"] for r in rows]
    summary = summarise(steps, {c: [r[c] for r in rows] for c in PROBE_COLUMNS}, metric, higher_is_better=False)
    record = {"settings": s, "corpus": {"train_tokens": len(train_ids), "heldout_tokens": len(held_ids),
                                        "heldout_sequences": len(held_seqs)},
              "metric": "held-out perplexity (" + ("last 10 % of every licence file" if corpus == "licenses"
                                                   else "every 10th stdlib module") + ")", "higher_is_better": False,
              "probe": "lm_head_gradient(model, probe_ids)  # 16 x 64 training tokens", "rows": rows,
              "summary": summary, "timings_s": timer.marks}
    write_result(task, record)
    plot_from_json(task)
    return record
