"""Diffusion: a tiny DDPM (T = 200) on Fashion-MNIST downsampled to 14x14, trained to predict epsilon
(task ``diffusion``) or v (task ``diffusion-v``); the probe (denoising MSE of that prediction through the
1x1 ``head``, seeded timesteps and noise) against held-out denoising MSE and a classifier-feature FID.

The FID here is the Frechet distance between Gaussians fitted to the 64-d penultimate features of a
small Fashion-MNIST classifier that this script trains (``FeatureClassifier``), for
``fid_samples`` deterministic DDIM samples against ``heldout_images`` test images. It is **not** Inception FID and its values are comparable only with each
other.

    python -m benchmarks.beyond.run diffusion diffusion-v
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg

from valfree.io.data import fashion_mnist_arrays
from valfree.probes.diffusion import diffusion_head_gradient, noised_batch

from .common import CACHE, PROBE_COLUMNS, Timer, set_threads, summarise, train_with_checkpoints, write_result
from .report import plot_from_json
from .models import FeatureClassifier, TinyUNet

SETTINGS = {"train_images": 12000, "steps": 500, "batch_size": 64, "lr": 2e-3, "checkpoints": 12,
            "probe_batch": 64, "seed": 0, "heldout_images": 1000, "heldout_draws": 1, "fid_samples": 128,
            "ddim_steps": 20, "classifier_epochs": 2}


def images_14(split: str, n: int) -> torch.Tensor:
    raw, _ = fashion_mnist_arrays(split=split)
    x = torch.from_numpy(raw[:n].astype(np.float32) / 255.0).unsqueeze(1)
    return F.avg_pool2d(x, 2) * 2 - 1  # (n, 1, 14, 14) in [-1, 1]


def labels(split: str, n: int) -> torch.Tensor:
    return torch.from_numpy(fashion_mnist_arrays(split=split)[1][:n].astype(np.int64))


def ddpm_loss(prediction: str):
    def loss(model, x0):
        ab = model.alphas_cumprod
        t = torch.randint(0, len(ab), (len(x0),))
        noise = torch.randn_like(x0)
        a = ab[t].float().view(-1, 1, 1, 1)
        target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
        return F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * noise, t), target)

    return loss


@torch.no_grad()
def heldout_mse(model, x0, draws: int, prediction: str = "epsilon") -> float:
    """MSE of the model's prediction (epsilon or v) on held-out images at seeded timesteps and noise
    (seeds 1000 + draw)."""
    model.eval()
    total = 0.0
    for d in range(draws):
        x_t, t, target = noised_batch(x0, model.alphas_cumprod, prediction, seed=1000 + d)
        total += sum(float(F.mse_loss(model(x_t[i:i + 500], t[i:i + 500]), target[i:i + 500], reduction="sum"))
                     for i in range(0, len(x0), 500))
    return total / (draws * x0.numel())


@torch.no_grad()
def ddim_sample(model, n: int, steps: int, seed: int = 0, prediction: str = "epsilon") -> torch.Tensor:
    """Deterministic DDIM (eta = 0) from seeded noise, on ``steps`` evenly spaced timesteps."""
    model.eval()
    ab = model.alphas_cumprod.float()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 14, 14, generator=g)
    ts = torch.linspace(len(ab) - 1, 0, steps).round().long()
    for i, t in enumerate(ts):
        a = ab[t]
        a_prev = ab[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
        out = model(x, t.repeat(n))
        # v = sqrt(a) eps - sqrt(1 - a) x0, so eps = sqrt(1 - a) x_t + sqrt(a) v.
        eps = out if prediction == "epsilon" else (1 - a).sqrt() * x + a.sqrt() * out
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x


def train_classifier(x, y, epochs: int, log) -> FeatureClassifier:
    torch.manual_seed(0)
    clf = FeatureClassifier()
    opt = torch.optim.Adam(clf.parameters(), 2e-3)
    for epoch in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 128):
            idx = perm[i:i + 128]
            opt.zero_grad()
            F.cross_entropy(clf(x[idx]), y[idx]).backward()
            opt.step()
    return clf.eval()


@torch.no_grad()
def feature_stats(clf, x) -> tuple[np.ndarray, np.ndarray]:
    f = torch.cat([clf.features(x[i:i + 500]) for i in range(0, len(x), 500)]).double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)


def frechet(mu1, s1, mu2, s2) -> float:
    covmean, _ = linalg.sqrtm(s1 @ s2, disp=False)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * covmean.real))


def run(log=print, prediction: str = "epsilon") -> dict:
    set_threads()
    s = {**SETTINGS, "prediction": prediction}
    task = "diffusion" if prediction == "epsilon" else "diffusion_v"
    timer = Timer()
    x_train = images_14("train", s["train_images"])
    x_test = images_14("test", s["heldout_images"])
    torch.manual_seed(s["seed"])
    model = TinyUNet()
    paths = train_with_checkpoints(model, ddpm_loss(prediction), (x_train,), s["steps"], s["batch_size"], s["lr"],
                                   s["checkpoints"], CACHE / task, s["seed"], log)
    timer.mark("train_s")
    clf = train_classifier(x_train, labels("train", s["train_images"]), s["classifier_epochs"], log)
    with torch.no_grad():
        clf_acc = float((clf(x_test).argmax(1) == labels("test", s["heldout_images"])).float().mean())
    real_mu, real_cov = feature_stats(clf, x_test)
    timer.mark("classifier_s")
    g = torch.Generator().manual_seed(s["seed"])
    px = x_train[torch.randperm(len(x_train), generator=g)[: s["probe_batch"]]]
    rows = []
    for step, path in paths:
        model.load_state_dict(torch.load(path, weights_only=True))
        probe = diffusion_head_gradient(model, px, model.alphas_cumprod, head="head", prediction=prediction, seed=s["seed"])
        mu, cov = feature_stats(clf, ddim_sample(model, s["fid_samples"], s["ddim_steps"], prediction=prediction))
        row = {"step": step, **{c: getattr(probe, c) for c in PROBE_COLUMNS}, "probe_loss": probe.loss,
               "path_used": probe.path, "heldout_mse": heldout_mse(model, x_test, s["heldout_draws"], prediction),
               "classifier_fid": frechet(mu, cov, real_mu, real_cov)}
        rows.append(row)
        log(f"step {step}: grad_norm {probe.grad_norm:.4g} held-out MSE {row['heldout_mse']:.4f} FID {row['classifier_fid']:.3f}")
    timer.mark("total_s")
    steps = [r["step"] for r in rows]
    columns = {c: [r[c] for r in rows] for c in PROBE_COLUMNS}
    summary = {
        "heldout_mse": summarise(steps, columns, [r["heldout_mse"] for r in rows], higher_is_better=False),
        "classifier_fid": summarise(steps, columns, [r["classifier_fid"] for r in rows], higher_is_better=False),
    }
    record = {"settings": s, "metric": f"held-out {prediction} MSE ({s['heldout_images']} test images x {s['heldout_draws']} "
              f"seeded draws) and classifier-feature FID ({s['fid_samples']} DDIM-{s['ddim_steps']} samples vs "
              f"{s['heldout_images']} test images; NOT Inception FID)", "higher_is_better": False,
              "feature_classifier_test_accuracy": clf_acc,
              "probe": f"diffusion_head_gradient(model, x0, model.alphas_cumprod, head='head', prediction='{prediction}', seed=0)",
              "rows": rows, "summary": summary, "timings_s": timer.marks}
    write_result(task, record)
    plot_from_json(task)
    return record
