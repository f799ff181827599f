"""The data each run sees: its training subset (with noisy labels where the regime says so), the
held-out pool (small labelled validation sets and an unlabeled probe batch) and the test set.

The held-out pool is one fixed slice of the train split, the same for every run and seed, so no run
ever trains on an image that serves as validation or unlabeled probe data.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from valfree.io.data import load_dataset

from .config import RunSpec

POOL_SEED = 12345


@lru_cache(maxsize=4)
def split_tensors(data: str, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, labels) of a whole split of ``data``, loaded once per process."""
    ds = load_dataset(data, split)
    x, y = ds.tensors
    return x.contiguous(), y.contiguous()


@dataclass
class RunData:
    x_train: torch.Tensor
    y_train: torch.Tensor  # the labels the model is trained on (noisy in the noisy regime)
    y_train_clean: torch.Tensor
    x_train_eval: torch.Tensor  # fixed subset of the training images: the training-loss readout
    y_train_eval: torch.Tensor
    x_val: torch.Tensor  # held-out, clean labels; the first k rows form the k-image validation set
    y_val: torch.Tensor
    x_unlabeled: torch.Tensor  # held-out images whose labels are never read
    x_probe: torch.Tensor  # fixed batch of training images for the head-gradient probe and TPV
    y_probe: torch.Tensor
    probe_index: torch.Tensor  # the probe batch's rows of x_train
    pred_index: torch.Tensor  # sorted rows of x_train whose predicted classes are recorded (superset of probe_index)
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def in_size(self) -> int:
        return int(self.x_train.shape[-1])


def symmetric_noise(labels: torch.Tensor, fraction: float, num_classes: int, rng: np.random.Generator) -> torch.Tensor:
    """Replace ``fraction`` of the labels by a uniformly drawn *different* class (exactly that many are wrong)."""
    y = labels.clone()
    n_flip = int(round(fraction * len(y)))
    idx = torch.from_numpy(rng.choice(len(y), n_flip, replace=False))
    shift = torch.from_numpy(rng.integers(1, num_classes, n_flip))
    y[idx] = (y[idx] + shift) % num_classes
    return y


def asymmetric_noise(labels: torch.Tensor, fraction: float, num_classes: int, rng: np.random.Generator) -> torch.Tensor:
    """Move ``fraction`` of the labels (drawn uniformly, exactly that many) from class c to (c + 1) % C."""
    y = labels.clone()
    n_flip = int(round(fraction * len(y)))
    idx = torch.from_numpy(rng.choice(len(y), n_flip, replace=False))
    y[idx] = (y[idx] + 1) % num_classes
    return y


NOISE = {"symmetric": symmetric_noise, "asymmetric": asymmetric_noise}
PRED_SEED = 777  # + the run's seed: the prediction subset, drawn apart from the training order


def prediction_subset(n_train: int, probe_idx: torch.Tensor, size: int, seed: int) -> torch.Tensor:
    """min(size, n_train) training rows, sorted: the probe batch's rows, then rows drawn with a fixed
    generator (independent of the training order) from the others."""
    size = min(size, n_train)
    probe = probe_idx[:size].numpy()
    others = np.setdiff1d(np.arange(n_train), probe)
    extra = np.random.default_rng(PRED_SEED + seed).permutation(others)[: size - len(probe)]
    return torch.from_numpy(np.sort(np.concatenate([probe, extra]))).long()


def run_data(spec: RunSpec) -> RunData:
    x_all, y_all = split_tensors(spec.data, "train")
    x_test, y_test = split_tensors(spec.data, "test")
    if spec.test_size is not None:
        x_test, y_test = x_test[: spec.test_size], y_test[: spec.test_size]
    order = np.random.default_rng(POOL_SEED).permutation(len(x_all))
    pool, rest = order[: spec.held_out], order[spec.held_out :]
    rng = np.random.default_rng(1000 + spec.seed)
    if spec.regime.train_size > len(rest):
        raise ValueError(f"{spec.name}: train_size {spec.regime.train_size} exceeds the {len(rest)} images outside the held-out pool")
    train_idx = torch.from_numpy(rng.permutation(rest)[: spec.regime.train_size])
    pool = torch.from_numpy(rng.permutation(pool))
    x_train, y_clean = x_all[train_idx], y_all[train_idx]
    noise = NOISE[spec.regime.noise_type]
    y_train = noise(y_clean, spec.regime.label_noise, 10, rng) if spec.regime.label_noise else y_clean
    n_val = max(spec.val_sizes)
    if n_val + spec.probe_size > len(pool):
        raise ValueError(f"{spec.name}: the held-out pool of {len(pool)} images cannot hold {n_val} validation + {spec.probe_size} probe images")
    val_idx, unl_idx = pool[:n_val], pool[n_val : n_val + spec.probe_size]
    n_eval = min(spec.train_eval_size, len(x_train))
    g = torch.Generator().manual_seed(spec.seed)
    probe_idx = torch.randperm(len(x_train), generator=g)[: spec.probe_size].sort().values
    return RunData(
        x_train=x_train, y_train=y_train, y_train_clean=y_clean,
        x_train_eval=x_train[:n_eval], y_train_eval=y_train[:n_eval],
        x_val=x_all[val_idx], y_val=y_all[val_idx],
        x_unlabeled=x_all[unl_idx],
        x_probe=x_train[probe_idx], y_probe=y_train[probe_idx],
        probe_index=probe_idx, pred_index=prediction_subset(len(x_train), probe_idx, spec.pred_subset, spec.seed),
        x_test=x_test, y_test=y_test,
    )
