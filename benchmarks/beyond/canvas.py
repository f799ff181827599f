"""Fashion-MNIST garments pasted on a 28x28 canvas, with per-pixel class masks and boxes.

Each garment is downscaled to 14x14 (2x2 average pooling) and pasted at a random position; a canvas
holds one or two garments that do not overlap. A pixel belongs to a garment when its intensity
exceeds 0.15 (in [0, 1]); the mask holds class + 1 there and 0 (background) elsewhere, and the box is
the tight box of those pixels, in pixel units, (x0, y0, x1, y1) with x1, y1 exclusive. Everything is
drawn from a seeded numpy generator, so a canvas set is a pure function of (split, size, seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from valfree.io.data import fashion_mnist_arrays

CANVAS = 28
GARMENT = 14
THRESHOLD = 0.15
NUM_CLASSES = 10


@dataclass
class Canvases:
    images: torch.Tensor  # (N, 1, 28, 28) float32, standardised
    masks: torch.Tensor  # (N, 28, 28) int64, 0 = background, class + 1 on garment pixels
    boxes: list[np.ndarray]  # per image (k, 4) float: x0, y0, x1, y1
    labels: list[np.ndarray]  # per image (k,) int


def _overlaps(a, b) -> bool:
    return not (a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1])


def make_canvases(split: str, size: int, seed: int) -> Canvases:
    raw, classes = fashion_mnist_arrays(split=split)
    small = raw.reshape(-1, GARMENT, 2, GARMENT, 2).mean((2, 4)) / 255.0
    rng = np.random.default_rng(seed)
    images = np.zeros((size, CANVAS, CANVAS), np.float32)
    masks = np.zeros((size, CANVAS, CANVAS), np.int64)
    boxes, labels = [], []
    for i in range(size):
        placed: list[tuple[int, int, int, int]] = []
        img_boxes, img_labels = [], []
        for _ in range(int(rng.integers(1, 3))):
            for _attempt in range(20):
                x, y = (int(v) for v in rng.integers(0, CANVAS - GARMENT + 1, 2))
                slot = (x, y, x + GARMENT, y + GARMENT)
                if not any(_overlaps(slot, p) for p in placed):
                    break
            else:
                continue
            k = int(rng.integers(len(small)))
            patch, on = small[k], small[k] > THRESHOLD
            if not on.any():
                continue
            placed.append(slot)
            images[i, y:y + GARMENT, x:x + GARMENT] = np.maximum(images[i, y:y + GARMENT, x:x + GARMENT], patch)
            masks[i, y:y + GARMENT, x:x + GARMENT][on] = int(classes[k]) + 1
            rows, cols = np.nonzero(on)
            img_boxes.append([x + cols.min(), y + rows.min(), x + cols.max() + 1, y + rows.max() + 1])
            img_labels.append(int(classes[k]))
        boxes.append(np.asarray(img_boxes, np.float32).reshape(-1, 4))
        labels.append(np.asarray(img_labels, np.int64))
    x = (torch.from_numpy(images) - 0.08) / 0.21  # approximate canvas pixel mean and std
    return Canvases(x.unsqueeze(1), torch.from_numpy(masks), boxes, labels)


def train_and_test_canvases(settings: dict) -> tuple[Canvases, Canvases]:
    """The training and test canvases of a task's settings, from neighbouring seeds."""
    return (make_canvases("train", settings["train_canvases"], seed=settings["seed"]),
            make_canvases("test", settings["test_canvases"], seed=settings["seed"] + 1))


def probe_indices(n: int, size: int, seed: int) -> torch.Tensor:
    """A seeded draw of ``size`` of ``n`` training canvases: the fixed probe batch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:size]
