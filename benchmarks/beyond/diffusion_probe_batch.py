"""How the diffusion probe's agreement with the held-out metrics depends on its batch size and seed.

Re-probes the cached checkpoints of ``benchmarks.beyond.diffusion`` (run that first) with probe
batches of 64, 256 and 512 training images and noise seeds 0, 1, 2, and correlates each series with
the held-out MSE and classifier FID already stored in benchmarks/results/beyond_diffusion.json. The
images are the first n of the same seeded permutation, so the batches are nested.

    python -m benchmarks.beyond.diffusion_probe_batch
"""

from __future__ import annotations

import json

import torch

from valfree.probes.diffusion import diffusion_head_gradient
from valfree.selection import correlations, gap_to_oracle, select_checkpoint

from .common import CACHE, RESULTS, Timer, set_threads, write_result
from .diffusion import SETTINGS, images_14
from .models import TinyUNet

SIZES = (64, 256, 512)
SEEDS = (0, 1, 2)


def main() -> None:
    set_threads()
    timer = Timer()
    base = json.loads((RESULTS / "beyond_diffusion.json").read_text())
    rows = base["rows"]
    steps = [r["step"] for r in rows]
    metrics = {m: [r[m] for r in rows] for m in ("heldout_mse", "classifier_fid")}
    x_train = images_14("train", SETTINGS["train_images"])
    g = torch.Generator().manual_seed(SETTINGS["seed"])
    perm = torch.randperm(len(x_train), generator=g)
    model = TinyUNet()
    series = {(n, seed): [] for n in SIZES for seed in SEEDS}
    for step in steps:
        model.load_state_dict(torch.load(CACHE / "diffusion" / f"step_{step:06d}.pt", weights_only=True))
        for n in SIZES:
            for seed in SEEDS:
                probe = diffusion_head_gradient(model, x_train[perm[:n]], model.alphas_cumprod, head="head", seed=seed)
                series[(n, seed)].append(probe.grad_norm)
        print(f"step {step} done", flush=True)
    results = []
    for (n, seed), values in series.items():
        entry = {"probe_batch": n, "seed": seed, "grad_norm": values}
        for m, y in metrics.items():
            c = correlations(values, y)
            sel = select_checkpoint(steps, values, tail=0.2, ema=3, mode="min")
            entry[m] = {"spearman": c.spearman, "spearman_p": c.spearman_p, "pearson": c.pearson,
                        "tail_argmin_gap": gap_to_oracle(sel.index, y, higher_is_better=False)}
        results.append(entry)
    timer.mark("total_s")
    write_result("diffusion_probe_batch", {"sizes": SIZES, "seeds": SEEDS, "steps": steps, "results": results,
                                           "timings_s": timer.marks})
    for e in results:
        print(e["probe_batch"], e["seed"], {m: round(e[m]["spearman"], 3) for m in metrics})


if __name__ == "__main__":
    main()
