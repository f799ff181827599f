"""Pruning criteria side by side: JBR against Torch-Pruning's criteria and the labelled ones.

    python benchmarks/prune_bench.py            # or: make bench-prune   (about 3 min on 2 idle cores)
    python benchmarks/prune_bench.py --quick    # one repeat, one ratio, four criteria: under a minute

A Fashion-MNIST CNN with BatchNorm (``valfree.models:cnn``, width 32) is trained once, seeded, and
cached in benchmarks/cache/. Every criterion then prunes it to 30 %, 50 % and 70 % of its channels
(local pruning: every layer loses the same share, so all criteria reach the same size), over three
repeats that change the calibration sample, the random criterion and the fine-tuning batches. Each
pruned model is evaluated as pruned (BatchNorm recalibrated on the calibration inputs) and after a
short label-free fine-tune (distillation to the unpruned model, the same for every criterion).

Writes benchmarks/results/prune_fmnist[_quick].json, the table in docs/pruning.md (between the
``prune-bench`` markers; the quick run writes docs/pruning_quick.md) and docs/img/prune_fmnist[_quick].png.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from valfree.io.data import fashion_mnist
from valfree.models import cnn
from valfree.pruning import (CRITERIA, CalibratedImportance, JBRImportance, calibration_from, distillation_loss,
                             finetune, make_importance, prune, recalibrate_batchnorm)
from valfree.pruning.calibration import training_batches

ROOT = Path(__file__).resolve().parents[1]
CACHE = ROOT / "benchmarks" / "cache" / "prune_fmnist_cnn.pt"
ORDER = ["jbr", "jacobian", "taylor", "hessian", "l1", "bn_scale", "fpgm", "whc", "random"]
BEGIN, END = "<!-- BEGIN prune-bench -->", "<!-- END prune-bench -->"

FULL = dict(ratios=[0.3, 0.5, 0.7], repeats=3, criteria=ORDER, steps=4, calibration=256, finetune=50,
            test_size=2000, fidelity_layers=["features.0", "features.4", "features.8"])
QUICK = dict(ratios=[0.5], repeats=1, criteria=["jbr", "l1", "taylor", "random"], steps=2, calibration=128,
             finetune=20, test_size=1000, fidelity_layers=["features.0"])
TRAIN = dict(train_size=20000, epochs=4, batch_size=128, lr=3e-3, seed=0)  # one-cycle schedule


def train_cnn() -> tuple[torch.nn.Module, dict]:
    """The benchmark's model, trained once and cached (weights only, loaded without pickle)."""
    torch.manual_seed(TRAIN["seed"])  # before the model is built: the initial weights are part of the recipe
    model = cnn(width=32)
    if CACHE.exists():
        model.load_state_dict(torch.load(CACHE, weights_only=True))
        return model.eval(), json.loads(CACHE.with_suffix(".json").read_text())
    data = fashion_mnist(split="train", limit=TRAIN["train_size"])
    x, y = data.tensors
    opt = torch.optim.Adam(model.parameters(), lr=TRAIN["lr"])
    steps_per_epoch = -(-len(x) // TRAIN["batch_size"])
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=TRAIN["lr"], total_steps=TRAIN["epochs"] * steps_per_epoch)
    g = torch.Generator().manual_seed(TRAIN["seed"])
    start = time.perf_counter()
    model.train()
    for _ in range(TRAIN["epochs"]):
        order = torch.randperm(len(x), generator=g)
        for i in range(0, len(x), TRAIN["batch_size"]):
            idx = order[i:i + TRAIN["batch_size"]]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            schedule.step()
    # Running BatchNorm statistics lag the last updates; re-estimate them once on the training images.
    recalibrate_batchnorm(model, list(x[:4096].split(256)))
    meta = {**TRAIN, "train_seconds": round(time.perf_counter() - start, 1)}
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), CACHE)
    CACHE.with_suffix(".json").write_text(json.dumps(meta))
    return model.eval(), meta


@torch.no_grad()
def accuracy(model: torch.nn.Module, test: TensorDataset) -> float:
    model.eval()
    x, y = test.tensors
    return sum(int((model(xb).argmax(1) == yb).sum()) for xb, yb in zip(x.split(500), y.split(500))) / len(y)


def run(config: dict) -> dict:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model, train_meta = train_cnn()
    train = fashion_mnist(split="train", limit=TRAIN["train_size"])  # the images the model was trained on
    g = torch.Generator().manual_seed(0)
    test_all = fashion_mnist(split="test")
    pick = torch.randperm(len(test_all), generator=g)[:config["test_size"]]
    test = TensorDataset(*(t[pick] for t in test_all.tensors))
    base_accuracy = accuracy(model, test)
    print(f"unpruned CNN: {100 * base_accuracy:.2f}% on {len(pick)} test images", flush=True)
    fidelity = removal_fidelity(model, train, config)
    rows = []
    for repeat in range(config["repeats"]):
        for ratio in config["ratios"]:
            for name in config["criteria"]:
                start = time.perf_counter()
                result = prune(model, train, name, ratio=ratio, steps=config["steps"],
                               calibration_size=config["calibration"], seed=repeat)
                prune_seconds = time.perf_counter() - start
                pruned_acc = accuracy(result.model, test)
                tuned = copy.deepcopy(result.model)
                start = time.perf_counter()
                batches = training_batches(train, batch_size=64, steps=config["finetune"], seed=1000 + repeat,
                                           device="cpu", inputs_only=True)
                finetune(tuned, batches, distillation_loss(model), lr=0.01)
                finetune_seconds = time.perf_counter() - start
                tuned_acc = accuracy(tuned, test)
                rows.append({
                    "criterion": name, "ratio": ratio, "repeat": repeat, "uses_labels": CRITERIA[name].uses_labels,
                    "params": result.final.params, "params_kept": result.final.params / result.unpruned.params,
                    "macs_kept": result.final.macs / result.unpruned.macs,
                    "accuracy": pruned_acc, "accuracy_finetuned": tuned_acc,
                    "kept_fraction": result.kept_fraction, "prune_seconds": round(prune_seconds, 2),
                    "finetune_seconds": round(finetune_seconds, 2),
                })
                print(f"repeat {repeat} ratio {ratio:.1f} {name:>9}: {100 * pruned_acc:6.2f}% -> "
                      f"{100 * tuned_acc:6.2f}% fine-tuned  ({prune_seconds:.1f}s + {finetune_seconds:.1f}s)",
                      flush=True)
    return {
        "config": config, "train": train_meta, "unpruned_accuracy": base_accuracy,
        "unpruned_params": result.unpruned.params, "machine": machine(), "rows": rows, "removal_fidelity": fidelity,
    }


def removal_fidelity(model: torch.nn.Module, train: TensorDataset, config: dict) -> dict:
    """Spearman rho between each criterion's channel scores and the measured effect of removing the channel.

    For every channel of the three conv layers, a copy of the unpruned model loses that one channel
    (Torch-Pruning removes it from the conv, its BatchNorm and the next layer's input) and the change
    is measured on the calibration images: sum over batches of the squared change in the pseudo-label
    NLL on JBR's confident batches (JBR's target), and the change in the true-label cross-entropy.
    """
    import torch_pruning as tp
    from scipy.stats import spearmanr

    calibration = calibration_from(train, batch_size=64, max_samples=config["calibration"], seed=0, labels=True)
    reference = JBRImportance()
    reference.prepare(model, calibration)
    example = calibration.example_inputs()
    layers = config["fidelity_layers"]

    @torch.no_grad()
    def losses(m):
        pseudo = torch.stack([F.cross_entropy(m(x), y) for x, y in reference.pseudo_batches])
        true = torch.stack([F.cross_entropy(m(x), y) for x, y in zip(calibration.inputs, calibration.labels)])
        return pseudo, true.mean()

    base_pseudo, base_true = losses(model)
    measured = {}
    for name in layers:
        pseudo_change, true_change = [], []
        for c in range(model.get_submodule(name).out_channels):
            pruned = copy.deepcopy(model)
            graph = tp.DependencyGraph().build_dependency(pruned, example)
            graph.get_pruning_group(pruned.get_submodule(name), tp.prune_conv_out_channels, [c]).prune()
            pseudo, true = losses(pruned)
            pseudo_change.append(float(((pseudo - base_pseudo) ** 2).sum()))
            true_change.append(float(true - base_true))
        measured[name] = (pseudo_change, true_change)
    rho = {}
    for criterion in config["criteria"]:
        torch.manual_seed(0)
        scorer_model = copy.deepcopy(model)
        imp = make_importance(criterion)
        if isinstance(imp, CalibratedImportance):
            imp.prepare(scorer_model, calibration)
            imp.update(scorer_model, calibration)
        graph = tp.DependencyGraph().build_dependency(scorer_model, example)
        rho[criterion] = {}
        for name in layers:
            layer = scorer_model.get_submodule(name)
            group = graph.get_pruning_group(layer, tp.prune_conv_out_channels, list(range(layer.out_channels)))
            scores = imp(group).detach().cpu().numpy()
            pseudo_change, true_change = measured[name]
            rho[criterion][name] = {"pseudo_nll": float(spearmanr(scores, pseudo_change).statistic),
                                    "true_ce": float(spearmanr(scores, true_change).statistic)}
        print(f"removal fidelity {criterion:>9}: " + " ".join(
            f"{v['pseudo_nll']:+.2f}/{v['true_ce']:+.2f}" for v in rho[criterion].values()), flush=True)
    return {"layers": layers, "rho": rho, "calibration_samples": calibration.num_samples,
            "kept_fraction": reference.kept_fraction}


def machine() -> dict:
    return {"platform": platform.platform(), "processor": platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__}


def summary(results: dict) -> dict:
    """mean and std over repeats per (criterion, ratio, fine-tuned?)."""
    out = {}
    for row in results["rows"]:
        for tuned, key in ((False, "accuracy"), (True, "accuracy_finetuned")):
            out.setdefault((row["criterion"], row["ratio"], tuned), []).append(row[key])
    return {k: (statistics.mean(v), statistics.stdev(v) if len(v) > 1 else 0.0, v) for k, v in out.items()}


def paired_wins(results: dict, baseline: str, ratio: float, key: str) -> tuple[int, int]:
    """(JBR better, comparisons) over repeats at one ratio, paired by repeat."""
    by = {(r["criterion"], r["repeat"]): r[key] for r in results["rows"] if r["ratio"] == ratio}
    repeats = sorted({rep for (_, rep) in by})
    return sum(by[("jbr", r)] > by[(baseline, r)] for r in repeats), len(repeats)


def markdown(results: dict, command: str, plot: str) -> str:
    cfg, stats = results["config"], summary(results)
    criteria, ratios = cfg["criteria"], cfg["ratios"]
    lines = [
        f"Reproduce with `{command}`; raw numbers in "
        f"[`benchmarks/results/{results['json_name']}`](../benchmarks/results/{results['json_name']}).",
        f"Machine: {results['machine']['processor']}, {results['machine']['threads']} threads, torch "
        f"{results['machine']['torch']}, CPU only. Model: `valfree.models:cnn` (width 32, "
        f"{results['unpruned_params']:,} parameters) trained for {results['train']['epochs']} epochs on "
        f"{results['train']['train_size']} Fashion-MNIST images (seed {results['train']['seed']}); unpruned accuracy "
        f"**{100 * results['unpruned_accuracy']:.2f}%** on {cfg['test_size']} test images.",
        f"Every run: {cfg['steps']} pruning steps, local pruning (every layer loses the same share of channels), "
        f"{cfg['calibration']} calibration images from the training set, BatchNorm recalibrated after each step; "
        f"fine-tuned = {cfg['finetune']} SGD steps (batch 64, lr 0.01) matching the unpruned model's predictions, "
        f"no labels. Mean ± standard deviation over {cfg['repeats']} repeat(s) (calibration sample, random scores "
        "and fine-tuning batches change with the repeat). Labelled criteria are marked with *.",
        "",
        "| criterion | " + " | ".join(f"{int(100 * r)}% ch. pruned | +fine-tune" for r in ratios) + " |",
        "|:--|" + "---:|---:|" * len(ratios),
    ]
    best = {(r, t): max(stats[(c, r, t)][0] for c in criteria) for r in ratios for t in (False, True)}
    for c in criteria:
        cells = []
        for r in ratios:
            for t in (False, True):
                mean, std, _ = stats[(c, r, t)]
                cell = f"{100 * mean:.2f} ± {100 * std:.2f}" if cfg["repeats"] > 1 else f"{100 * mean:.2f}"
                cells.append(f"**{cell}**" if mean == best[(r, t)] else cell)
        label = f"{c}*" if CRITERIA[c].uses_labels else c
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    kept = {r: statistics.mean(row["params_kept"] for row in results["rows"] if row["ratio"] == r) for r in ratios}
    lines += ["", "Parameters kept: " + ", ".join(f"{int(100 * r)}% channels pruned → {100 * kept[r]:.1f}%"
                                                   for r in ratios) + ".", ""]
    lines += ["JBR against each baseline, paired by repeat (JBR higher / comparisons), as pruned and fine-tuned:", "",
              "| baseline | " + " | ".join(f"{int(100 * r)}%" for r in ratios) + " |", "|:--|" + "---:|" * len(ratios)]
    for c in criteria:
        if c == "jbr":
            continue
        cells = []
        for r in ratios:
            a, n = paired_wins(results, c, r, "accuracy")
            b, _ = paired_wins(results, c, r, "accuracy_finetuned")
            cells.append(f"{a}/{n}, {b}/{n}")
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    seconds = {c: statistics.mean(row["prune_seconds"] for row in results["rows"] if row["criterion"] == c)
               for c in criteria}
    fid = results["removal_fidelity"]
    lines += ["", "How well each score ranks the channels by the measured effect of removing each one alone "
              f"(Spearman rho per conv layer, {fid['calibration_samples']} calibration images, "
              f"{100 * fid['kept_fraction']:.0f}% of them confident enough for JBR's pseudo-labels): "
              "first against the change in pseudo-label NLL (sum over batches of its square, JBR's target), "
              "then against the change in true-label cross-entropy.", "",
              "| criterion | " + " | ".join(f"{n} pseudo NLL | {n} true CE" for n in fid["layers"]) + " |",
              "|:--|" + "---:|---:|" * len(fid["layers"])]
    for c in criteria:
        cells = [f"{fid['rho'][c][n][k]:+.2f}" for n in fid["layers"] for k in ("pseudo_nll", "true_ce")]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    lines += ["", "Mean pruning time per run (scoring + pruning + BatchNorm recalibration, "
              f"{cfg['steps']} steps): " + ", ".join(f"{c} {seconds[c]:.1f}s" for c in criteria) + ".", "",
              f"![accuracy against parameters]({plot})"]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg, stats = results["config"], summary(results)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for ax, tuned in zip(axes, (False, True)):
        for c in cfg["criteria"]:
            xs = [1.0] + [statistics.mean(r["params_kept"] for r in results["rows"] if r["ratio"] == q)
                          for q in cfg["ratios"]]
            ys = [results["unpruned_accuracy"]] + [stats[(c, q, tuned)][0] for q in cfg["ratios"]]
            es = [0.0] + [stats[(c, q, tuned)][1] for q in cfg["ratios"]]
            style = dict(lw=2.6, color="black", zorder=5) if c == "jbr" else dict(lw=1.2, alpha=0.85)
            label = f"{c}*" if CRITERIA[c].uses_labels else c
            ax.errorbar([100 * x for x in xs], [100 * y for y in ys], yerr=[100 * e for e in es], marker="o",
                        ms=3.5, capsize=2, label=label, linestyle="--" if CRITERIA[c].uses_labels else "-", **style)
        ax.set_xlabel("parameters kept (%)")
        ax.set_title("fine-tuned (label-free distillation)" if tuned else "pruned, BatchNorm recalibrated")
        ax.invert_xaxis()
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].legend(fontsize=8, ncol=2, loc="lower left")
    fig.suptitle("Fashion-MNIST CNN: accuracy against size for each criterion (* uses labels)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_docs(text: str, path: Path) -> None:
    """Replace the table between the markers of ``path``, or write ``path`` afresh."""
    block = f"{BEGIN}\n{text}\n{END}"
    if path.exists() and BEGIN in path.read_text():
        old = path.read_text()
        path.write_text(old[:old.index(BEGIN)] + block + old[old.index(END) + len(END):])
    else:
        path.write_text(f"# Pruning benchmark (quick run)\n\n{block}\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one repeat, one ratio, four criteria")
    args = parser.parse_args()
    config = QUICK if args.quick else FULL
    suffix = "_quick" if args.quick else ""
    start = time.perf_counter()
    results = run(config)
    results["wall_seconds"] = round(time.perf_counter() - start, 1)
    results["json_name"] = f"prune_fmnist{suffix}.json"
    out = ROOT / "benchmarks" / "results" / results["json_name"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    png = ROOT / "docs" / "img" / f"prune_fmnist{suffix}.png"
    plot(results, png)
    command = "python benchmarks/prune_bench.py --quick" if args.quick else "make bench-prune"
    docs = ROOT / "docs" / ("pruning_quick.md" if args.quick else "pruning.md")
    write_docs(markdown(results, command, f"img/{png.name}"), docs)
    print(f"wrote {out}, {png} and {docs} in {results['wall_seconds']:.0f}s")


if __name__ == "__main__":
    main()
