"""TPV stability on Fashion-MNIST: training-set TPV against test-set TPV for MLPs of several widths.

    nice -n 10 python benchmarks/tpv_stability.py      # or: make bench-tpv

One-hidden-layer MLPs of widths 8 to 512 are trained for 3 epochs on 10,000 training images. For each,
TPV is measured on 512 training inputs and on 512 test inputs under isotropic noise, 8-bit per-tensor
quantization (head kept in full precision) and label-free SGD noise, with valfree.tpv_stability. Only
the inputs of the test split are loaded into the measurement (valfree.io.data.inputs_only); no test
label is read anywhere in this script. Writes benchmarks/results/tpv_stability.json,
docs/tpv_stability.md and docs/img/tpv_stability.png.
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from valfree.io.data import fashion_mnist
from valfree.io.data import inputs_only
from valfree.models import mlp
from valfree.tpv import Isotropic, Quantization, SGDNoise, tpv_stability

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = (8, 32, 128, 512)
NOISES = {
    "iso:1e-2": Isotropic(1e-2),
    "quant:8 (head fp)": Quantization(8, "tensor", skip=("head",)),
    "sgd:lr=0.1,batch=128 (ggn)": SGDNoise(0.1, 128),
}


def train(width, x, y, epochs=3, seed=0):
    torch.manual_seed(seed)
    model = mlp(num_classes=10, in_size=28, width=width, depth=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(epochs):
        order = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = order[i : i + 128]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        train_loss = float(F.cross_entropy(model(x), y))
    return model, train_loss


def main():
    train_set = fashion_mnist(split="train", limit=10000)
    x, y = train_set.tensors
    x_train = inputs_only(train_set, 512, seed=0)
    x_test = inputs_only(fashion_mnist(split="test"), 512, seed=0)
    rows = []
    for width in WIDTHS:
        model, train_loss = train(width, x, y)
        for name, noise in NOISES.items():
            t = time.perf_counter()
            result = tpv_stability(model, x_train, x_test, noise, probes=8, seed=0)
            rows.append({
                "width": width, "noise": name, "train_loss": train_loss,
                "train_tpv": result.train.value, "train_stderr": result.train.input_stderr,
                "test_tpv": result.test.value, "test_stderr": result.test.input_stderr,
                "ratio": result.ratio, "ratio_low": result.ratio_low, "ratio_high": result.ratio_high,
                "verdict": result.verdict, "seconds": time.perf_counter() - t,
            })
            print(f"width {width:4d} {name:28s} {result.message}")
    meta = {"command": "nice -n 10 python benchmarks/tpv_stability.py", "machine": platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    out = ROOT / "benchmarks" / "results" / "tpv_stability.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    write_docs(rows, meta)
    plot(rows)


def write_docs(rows, meta):
    lines = [
        "# TPV stability on Fashion-MNIST",
        "",
        f"Reproduce with `{meta['command']}`; raw numbers in "
        "[`benchmarks/results/tpv_stability.json`](../benchmarks/results/tpv_stability.json).",
        f"Machine: {meta['machine']}, {meta['threads']} threads, torch {meta['torch']}, float32, CPU.",
        "",
        "One-hidden-layer MLPs trained 3 epochs on 10,000 images; TPV (trace estimator, 8 probes per input)",
        "on 512 training inputs and 512 test inputs. Standard errors are over inputs; the ratio's 95 % interval",
        "is the delta method on the log ratio, paired over shared draws for SGD noise. No test label is read.",
        "",
        "| width | train loss | noise | train TPV | test TPV | train/test [95% CI] | verdict |",
        "|---:|---:|:--|---:|---:|:--|:--|",
    ]
    for r in rows:
        lines.append(
            f"| {r['width']} | {r['train_loss']:.3f} | {r['noise']} | {r['train_tpv']:.4g} ± {r['train_stderr']:.2g} | "
            f"{r['test_tpv']:.4g} ± {r['test_stderr']:.2g} | {r['ratio']:.3f} [{r['ratio_low']:.3f}, {r['ratio_high']:.3f}] | {r['verdict']} |"
        )
    ratios = [r["ratio"] for r in rows]
    lines += ["", f"Ratios range from {min(ratios):.3f} to {max(ratios):.3f} over {len(rows)} (width, noise) pairs.",
              "", "![train vs test TPV](img/tpv_stability.png)", ""]
    (ROOT / "docs" / "tpv_stability.md").write_text("\n".join(lines))


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    markers = dict(zip(WIDTHS, "os^D"))
    for k, name in enumerate(NOISES):
        for r in (r for r in rows if r["noise"] == name):
            ax.errorbar(r["train_tpv"], r["test_tpv"], xerr=2 * r["train_stderr"], yerr=2 * r["test_stderr"],
                        fmt=markers[r["width"]], color=f"C{k}", ms=6, capsize=2,
                        label=name if r["width"] == WIDTHS[0] else None)
    values = [v for r in rows for v in (r["train_tpv"], r["test_tpv"])]
    lo, hi = min(values) / 2, max(values) * 2
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training-set TPV")
    ax.set_ylabel("test-set TPV")
    ax.set_title("Fashion-MNIST MLPs; markers o s ^ D = width " + ", ".join(map(str, WIDTHS)), fontsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
    fig.savefig(ROOT / "docs" / "img" / "tpv_stability.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
