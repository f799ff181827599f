"""Segmentation: a small fully convolutional network on Fashion-MNIST canvases; the probe (per-pixel
cross-entropy through the 1x1 ``classifier``, every pixel a sample) against test mIoU.

    python -m benchmarks.beyond.run segmentation
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from valfree import head_gradient

from .canvas import NUM_CLASSES, probe_indices, train_and_test_canvases
from .common import CACHE, PROBE_COLUMNS, Timer, set_threads, summarise, train_with_checkpoints, write_result
from .report import plot_from_json
from .models import SegmentationFCN

SETTINGS = {"train_canvases": 4000, "test_canvases": 1000, "steps": 500, "batch_size": 32, "lr": 3e-3,
            "checkpoints": 20, "probe_batch": 32, "seed": 0}


@torch.no_grad()
def mean_iou(model, x, masks, num_classes: int = NUM_CLASSES + 1, batch: int = 250) -> float:
    """mIoU over the classes present in the prediction or the ground truth (background included)."""
    model.eval()
    conf = torch.zeros(num_classes, num_classes, dtype=torch.long)
    for i in range(0, len(x), batch):
        pred = model(x[i:i + batch]).argmax(1)
        conf += torch.bincount(masks[i:i + batch].reshape(-1) * num_classes + pred.reshape(-1),
                               minlength=num_classes**2).reshape(num_classes, num_classes)
    inter = conf.diag().double()
    union = conf.sum(0).double() + conf.sum(1).double() - inter
    present = union > 0
    return float((inter[present] / union[present]).mean())


def run(log=print) -> dict:
    set_threads()
    s = SETTINGS
    timer = Timer()
    train, test = train_and_test_canvases(s)
    torch.manual_seed(s["seed"])
    model = SegmentationFCN()
    paths = train_with_checkpoints(
        model, lambda m, x, y: F.cross_entropy(m(x), y), (train.images, train.masks), s["steps"], s["batch_size"],
        s["lr"], s["checkpoints"], CACHE / "segmentation", s["seed"], log)
    timer.mark("train_s")
    idx = probe_indices(len(train.images), s["probe_batch"], s["seed"])
    px, pm = train.images[idx], train.masks[idx]
    rows = []
    for step, path in paths:
        model.load_state_dict(torch.load(path, weights_only=True))
        probe = head_gradient(model, px, pm, head="classifier")
        rows.append({"step": step, **{c: getattr(probe, c) for c in PROBE_COLUMNS}, "probe_loss": probe.loss,
                     "path_used": probe.path, "locations": probe.batch_size, "miou": mean_iou(model, test.images, test.masks)})
        log(f"step {step}: grad_norm {probe.grad_norm:.4g} mIoU {rows[-1]['miou']:.4f}")
    timer.mark("total_s")
    steps = [r["step"] for r in rows]
    metric = [r["miou"] for r in rows]
    summary = summarise(steps, {c: [r[c] for r in rows] for c in PROBE_COLUMNS}, metric, higher_is_better=True)
    record = {"settings": s, "metric": "test mIoU (11 classes incl. background, 1000 canvases)",
              "higher_is_better": True, "probe": "head_gradient(model, x, masks, head='classifier')",
              "rows": rows, "summary": summary, "timings_s": timer.marks}
    write_result("segmentation", record)
    plot_from_json("segmentation")
    return record
