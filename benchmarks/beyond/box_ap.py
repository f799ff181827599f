"""Box-matching average precision, written here because torchmetrics' MeanAveragePrecision needs
torchvision (and pycocotools or faster-coco-eval), which this environment does not have.

Per class: every detection of that class, over all images, is sorted by descending score (stable for
ties) and matched greedily to the unmatched ground-truth box of the same class and image with the
highest IoU, if that IoU is >= the threshold (COCO's rule); a match is a true positive, anything else
a false positive. AP is the area under the precision-recall curve after making precision monotone
(precision at recall r is the best precision at any recall >= r): the all-point interpolation of
PASCAL VOC 2010+. mAP is the mean over the classes that have at least one ground-truth box.
"""

from __future__ import annotations

import numpy as np


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (n, m) of boxes (x0, y0, x1, y1)."""
    a, b = np.asarray(a, float).reshape(-1, 4), np.asarray(b, float).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(2)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(1)
    union = area_a[:, None] + area_b[None, :] - inter
    return np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)


def average_precision_from_matches(tp: np.ndarray, n_gt: int) -> float:
    """All-point interpolated AP of detections already sorted by score (tp: 1 true positive, 0 false)."""
    if n_gt == 0:
        raise ValueError("AP is undefined without ground-truth boxes")
    tp = np.asarray(tp, float)
    if tp.size == 0:
        return 0.0
    ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
    recall = ctp / n_gt
    precision = ctp / (ctp + cfp)
    # Monotone envelope from the right, then the area under the step function of recall.
    envelope = np.maximum.accumulate(precision[::-1])[::-1]
    r = np.concatenate([[0.0], recall])
    return float(np.sum((r[1:] - r[:-1]) * envelope))


def mean_average_precision(detections, ground_truth, iou_threshold: float = 0.5) -> dict:
    """mAP and per-class AP.

    ``detections``: per image a tuple (boxes (k, 4), scores (k,), labels (k,)); ``ground_truth``: per
    image a tuple (boxes (m, 4), labels (m,)).
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} images of detections but {len(ground_truth)} of ground truth")
    classes = sorted({int(c) for _, labels in ground_truth for c in np.asarray(labels).reshape(-1)})
    per_class = {}
    for c in classes:
        entries = []  # (score, image, box)
        n_gt = 0
        for i, ((boxes, scores, labels), (gt_boxes, gt_labels)) in enumerate(zip(detections, ground_truth)):
            n_gt += int((np.asarray(gt_labels) == c).sum())
            sel = np.asarray(labels).reshape(-1) == c
            for box, score in zip(np.asarray(boxes, float).reshape(-1, 4)[sel], np.asarray(scores, float).reshape(-1)[sel]):
                entries.append((score, i, box))
        order = sorted(range(len(entries)), key=lambda j: -entries[j][0])
        matched: dict[int, np.ndarray] = {}
        tp = []
        for j in order:
            _, i, box = entries[j]
            gt_boxes, gt_labels = ground_truth[i]
            gsel = np.flatnonzero(np.asarray(gt_labels).reshape(-1) == c)
            used = matched.setdefault(i, np.zeros(len(gsel), bool))
            hit = 0
            if len(gsel):
                ious = box_iou(box[None], np.asarray(gt_boxes, float).reshape(-1, 4)[gsel])[0]
                ious[used] = -1
                k = int(np.argmax(ious))
                if ious[k] >= iou_threshold:
                    used[k] = True
                    hit = 1
            tp.append(hit)
        per_class[c] = average_precision_from_matches(np.asarray(tp), n_gt)
    return {"map": float(np.mean(list(per_class.values()))) if per_class else float("nan"), "per_class": per_class}
