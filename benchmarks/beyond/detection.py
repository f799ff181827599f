"""Detection: a tiny CenterNet on Fashion-MNIST canvases; the two-head probe (focal heatmap through
``heatmap``, L1 box size through ``box``, combined as the joint gradient of focal + 0.1 L1) against
test mAP@0.5 from :mod:`benchmarks.beyond.box_ap`.

    python -m benchmarks.beyond.run detection
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from valfree.probes.losses import centernet_focal_loss
from valfree.probes.multi_head import head_gradients

from .box_ap import mean_average_precision
from .canvas import CANVAS, NUM_CLASSES, probe_indices, train_and_test_canvases
from .common import CACHE, PROBE_COLUMNS, Timer, set_threads, summarise, train_with_checkpoints, write_result
from .report import plot_from_json
from .models import CenterNet

STRIDE = 2
GRID = CANVAS // STRIDE
BOX_WEIGHT = 0.1  # CenterNet's lambda_size
SETTINGS = {"train_canvases": 4000, "test_canvases": 1000, "steps": 600, "batch_size": 32, "lr": 3e-3,
            "checkpoints": 20, "probe_batch": 32, "seed": 0, "max_detections": 10, "iou_threshold": 0.5}


def centernet_targets(boxes, labels) -> torch.Tensor:
    """(classes + 2, 14, 14): Gaussian centre heatmaps (exactly 1 at each centre cell), then the box
    width and height in output cells at centre cells and NaN elsewhere (the L1 loss skips NaN)."""
    target = torch.zeros(NUM_CLASSES + 2, GRID, GRID)
    target[NUM_CLASSES:] = float("nan")
    ys, xs = torch.meshgrid(torch.arange(GRID), torch.arange(GRID), indexing="ij")
    for (x0, y0, x1, y1), c in zip(boxes, labels):
        cx, cy = int((x0 + x1) / 2 // STRIDE), int((y0 + y1) / 2 // STRIDE)
        w, h = (x1 - x0) / STRIDE, (y1 - y0) / STRIDE
        sigma = max(0.5, float(np.sqrt(w * h)) / 6)
        bump = torch.exp(-((xs - cx) ** 2 + (ys - cy) ** 2) / (2 * sigma**2))
        target[c] = torch.maximum(target[c], bump)
        target[NUM_CLASSES:, cy, cx] = torch.tensor([w, h])
    return target


def training_loss(model, x, target):
    out = model(x)
    box_pred, box_target = out[:, NUM_CLASSES:], target[:, NUM_CLASSES:]
    has = ~torch.isnan(box_target)
    return centernet_focal_loss(out[:, :NUM_CLASSES], target[:, :NUM_CLASSES]) + BOX_WEIGHT * F.l1_loss(box_pred[has], box_target[has])


@torch.no_grad()
def detect(model, x, k: int):
    """Top-k 3x3 local maxima of the sigmoid heatmap per image, as (boxes, scores, labels) in pixels."""
    model.eval()
    out = model(x)
    p = torch.sigmoid(out[:, :NUM_CLASSES])
    p = p * (p == F.max_pool2d(p, 3, 1, 1))
    scores, flat = p.flatten(1).topk(k)
    labels, cell = flat // (GRID * GRID), flat % (GRID * GRID)
    cy, cx = cell // GRID, cell % GRID
    results = []
    for i in range(len(x)):
        w = out[i, NUM_CLASSES, cy[i], cx[i]] * STRIDE
        h = out[i, NUM_CLASSES + 1, cy[i], cx[i]] * STRIDE
        px, py = (cx[i].float() + 0.5) * STRIDE, (cy[i].float() + 0.5) * STRIDE
        boxes = torch.stack([px - w / 2, py - h / 2, px + w / 2, py + h / 2], 1)
        results.append((boxes.numpy(), scores[i].numpy(), labels[i].numpy()))
    return results


def test_map(model, test, k: int, thr: float) -> float:
    dets = []
    for i in range(0, len(test.images), 250):
        dets += detect(model, test.images[i:i + 250], k)
    return mean_average_precision(dets, list(zip(test.boxes, test.labels)), thr)["map"]


def run(log=print) -> dict:
    set_threads()
    s = SETTINGS
    timer = Timer()
    train, test = train_and_test_canvases(s)
    targets = torch.stack([centernet_targets(b, l) for b, l in zip(train.boxes, train.labels)])
    torch.manual_seed(s["seed"])
    model = CenterNet()
    paths = train_with_checkpoints(model, training_loss, (train.images, targets), s["steps"], s["batch_size"],
                                   s["lr"], s["checkpoints"], CACHE / "detection", s["seed"], log)
    timer.mark("train_s")
    idx = probe_indices(len(train.images), s["probe_batch"], s["seed"])
    px, pt = train.images[idx], targets[idx]
    probe_targets = {"heatmap": pt[:, :NUM_CLASSES], "box": pt[:, NUM_CLASSES:]}
    rows = []
    for step, path in paths:
        model.load_state_dict(torch.load(path, weights_only=True))
        probe = head_gradients(model, px, probe_targets, {"heatmap": "focal", "box": "l1"}, {"box": BOX_WEIGHT})
        row = {"step": step, **{c: getattr(probe, c) for c in PROBE_COLUMNS}, "probe_loss": probe.loss}
        for name, h in probe.heads.items():
            row[f"{name}.grad_norm"] = h.grad_norm
            row[f"{name}.path_used"] = h.path
            row[f"{name}.samples"] = h.batch_size
        row["map50"] = test_map(model, test, s["max_detections"], s["iou_threshold"])
        rows.append(row)
        log(f"step {step}: grad_norm {probe.grad_norm:.4g} mAP@0.5 {row['map50']:.4f}")
    timer.mark("total_s")
    steps = [r["step"] for r in rows]
    metric = [r["map50"] for r in rows]
    columns = {c: [r[c] for r in rows] for c in PROBE_COLUMNS}
    columns.update({f"{h}.grad_norm": [r[f"{h}.grad_norm"] for r in rows] for h in ("heatmap", "box")})
    summary = summarise(steps, columns, metric, higher_is_better=True)
    record = {"settings": s, "metric": "test mAP@0.5 (box_ap.py, 1000 canvases, 10 detections per image)",
              "higher_is_better": True,
              "probe": "head_gradients(model, x, {heatmap, box targets}, {'heatmap': 'focal', 'box': 'l1'}, {'box': 0.1})",
              "rows": rows, "summary": summary, "timings_s": timer.marks}
    write_result("detection", record)
    plot_from_json("detection")
    return record
