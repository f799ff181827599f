"""Data specs: ``fashion-mnist[:DIR]``, ``digits``, ``npz:PATH`` and ``MODULE:FUNCTION``.

The built-in specs resolve to a ``torch.utils.data.Dataset`` of ``(input, label)`` pairs; unlabeled
sets use label -1. Images come as float tensors of shape (1, H, W), scaled to [0, 1] and standardised
with the training set's mean and standard deviation. A ``MODULE:FUNCTION`` dataset may also give dicts,
as a Hugging Face Trainer's dataset does (``input_ids``, ``attention_mask``, ``labels``...): the probe
batch is then a dict of keyword inputs (see :mod:`valfree.batches`), padded where lengths differ.
"""

from __future__ import annotations

import gzip
import inspect
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from ..batches import collate, input_of, label_of, split_batch
from ..errors import ValfreeError
from .factory import resolve_callable

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
# Training-set statistics of Fashion-MNIST pixels scaled to [0, 1].
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530
SPLITS = ("train", "test")


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        data = fh.read()
    zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or dtype_code != 0x08:
        raise ValfreeError(f"{path} is not an unsigned-byte IDX file.")
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem, stem.replace("-idx", ".idx")):
        if (directory / name).exists():
            return directory / name
    raise ValfreeError(
        f"no {stem}[.gz] in {directory}; on Debian run 'apt-get install dataset-fashion-mnist', "
        "or point the spec at a folder with the IDX files: fashion-mnist:/path/to/dir."
    )


def fashion_mnist_available(directory: str | os.PathLike | None = None) -> bool:
    d = Path(directory) if directory else FASHION_MNIST_DIR
    return (d / "train-images-idx3-ubyte.gz").exists() or (d / "train-images-idx3-ubyte").exists()


def fashion_mnist_arrays(directory: str | os.PathLike | None = None, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Raw uint8 images (N, 28, 28) and labels (N,) of one split, read from the IDX files."""
    d = Path(directory) if directory else FASHION_MNIST_DIR
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(d, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(d, f"{prefix}-labels-idx1-ubyte"))
    return images, labels


def fashion_mnist(directory: str | os.PathLike | None = None, split: str = "train", limit: int | None = None) -> TensorDataset:
    """Fashion-MNIST as standardised (1, 28, 28) float tensors and int64 labels."""
    images, labels = fashion_mnist_arrays(directory, split)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = (torch.from_numpy(images.astype(np.float32)) / 255.0 - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return TensorDataset(x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))


def digits(split: str = "train", test_fraction: float = 0.2, seed: int = 0) -> TensorDataset:
    """scikit-learn's 8x8 digits as (1, 8, 8) standardised tensors; a seeded 80/20 train/test split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise ValfreeError("the 'digits' data spec needs scikit-learn: pip install scikit-learn.") from None
    bunch = load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(round(test_fraction * len(x)))
    idx = order[n_test:] if split == "train" else order[:n_test]
    train = x[order[n_test:]]
    mean, std = float(train.mean()), float(train.std())
    xs = (torch.from_numpy(x[idx]) - mean) / std
    return TensorDataset(xs.reshape(-1, 1, 8, 8), torch.from_numpy(y[idx]))


def npz(path: str | os.PathLike) -> TensorDataset:
    """Arrays ``x`` (inputs) and optional ``y`` (labels) from an .npz file, loaded without pickle."""
    p = Path(path)
    if not p.is_file():
        raise ValfreeError(f"the data file {p} does not exist.")
    try:
        with np.load(p, allow_pickle=False) as f:
            if "x" not in f:
                raise ValfreeError(f"{p} has arrays {sorted(f.files)} but no 'x'; save inputs as x= (and labels as y=).")
            x = torch.from_numpy(np.array(f["x"]))
            y = torch.from_numpy(np.array(f["y"])).long() if "y" in f else torch.full((len(x),), -1, dtype=torch.long)
    except ValfreeError:
        raise
    except Exception as exc:
        raise ValfreeError(f"cannot read {p} as an .npz archive without pickle: {exc}.") from None
    if x.dtype in (torch.float64, torch.float16):
        x = x.float()
    if len(y) != len(x):
        raise ValfreeError(f"{p} has {len(x)} inputs but {len(y)} labels.")
    return TensorDataset(x, y)


def _call_user_dataset(fn, split: str) -> Dataset:
    accepts_split = "split" in inspect.signature(fn).parameters if _has_signature(fn) else False
    return fn(split=split) if accepts_split else fn()


def _has_signature(fn) -> bool:
    try:
        inspect.signature(fn)
        return True
    except (TypeError, ValueError):
        return False


def load_dataset(spec: str, split: str = "train") -> Dataset:
    """Resolve a data spec (see the module docstring) to a Dataset for ``split`` ('train' or 'test').

    A ``MODULE:FUNCTION`` function receives ``split=`` when its signature accepts it.
    """
    if split not in SPLITS:
        raise ValfreeError(f"split must be one of {SPLITS}, not {split!r}.")
    name, _, arg = spec.partition(":")
    if name == "fashion-mnist":
        return fashion_mnist(arg or None, split)
    if spec == "digits":
        return digits(split)
    if name == "npz":
        if not arg:
            raise ValfreeError("the npz data spec needs a path: npz:/path/to/data.npz.")
        return npz(arg)
    if arg and (name.endswith(".py") or "." in name or Path(name).exists() or name.isidentifier()):
        fn = resolve_callable(spec, "data function")
        try:
            ds = _call_user_dataset(fn, split)
        except Exception as exc:
            raise ValfreeError(f"the data function {spec!r} raised {type(exc).__name__}: {exc}.") from None
        if not hasattr(ds, "__getitem__") or not hasattr(ds, "__len__"):
            raise ValfreeError(f"the data function {spec!r} returned a {type(ds).__name__}, not a map-style torch Dataset.")
        return ds
    raise ValfreeError(
        f"unknown data spec {spec!r}; use fashion-mnist[:DIR], digits, npz:PATH or MODULE:FUNCTION."
    )


def split_sample(item):
    """(input, label) from a dataset item; label -1 where the dataset has none."""
    label = label_of(item)
    return input_of(item), -1 if label is None else label


def seeded_indices(dataset: Dataset, size: int, seed: int) -> torch.Tensor:
    """The sorted indices of a seeded draw of ``size`` items (all of them if fewer), the same for a given seed."""
    n = len(dataset)
    if n == 0:
        raise ValfreeError("the dataset is empty, so no probe batch can be drawn.")
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=g)[: min(size, n)].sort().values


def probe_batch(dataset: Dataset, size: int = 256, seed: int = 0, pad_token_id: int = 0) -> tuple[object, torch.Tensor]:
    """A fixed, seeded batch of ``size`` items (all of them if fewer): the same batch for every checkpoint.

    Returns ``(inputs, labels)``. The inputs keep the items' form: a tensor, or for a dataset of dicts a
    dict of keyword inputs, padded as :func:`valfree.batches.collate` pads (``input_ids`` with
    ``pad_token_id``, the model's pad token). The labels are -1 for every item when the dataset has none.
    """
    idx = seeded_indices(dataset, size, seed)
    if isinstance(dataset, TensorDataset):
        tensors = dataset.tensors
        x = tensors[0][idx]
        y = tensors[1][idx] if len(tensors) > 1 else torch.full((len(idx),), -1, dtype=torch.long)
        return x, y
    x, y = split_batch(collate([dataset[int(i)] for i in idx], pad_token_id))
    if y is None:
        y = torch.full((len(idx),), -1, dtype=torch.long)
    return x, torch.as_tensor(y)


def inputs_only(dataset: Dataset, size: int, seed: int, pad_token_id: int = 0):
    """The inputs of :func:`probe_batch`'s draw (same seed, same items); labels are never read."""
    idx = seeded_indices(dataset, size, seed)
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][idx]
    return collate([input_of(dataset[int(i)]) for i in idx], pad_token_id)
