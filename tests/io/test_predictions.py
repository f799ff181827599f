"""The prediction sidecar: round trips, refusals and hostile files."""

import json

import numpy as np
import pytest

from valfree.errors import ValfreeError
from valfree.io.predictions import PredictionSidecar, key_name


def _meta(size=5, **kw):
    return {"data": "digits", "split": "train", "seed": 0, "size": size, "index_hash": "abc", **kw}


def test_round_trip_and_replacement(tmp_path):
    car = PredictionSidecar(tmp_path / "scores.csv")
    car.open(_meta(), np.array([0, 1, 2, -1, 4]))
    key = ("ckpt/step_1.pt", "123", "1.000000")
    assert car.get(key) is None
    car.put(key, np.array([1, 1, 2, 3, 4]))
    np.testing.assert_array_equal(car.get(key), [1, 1, 2, 3, 4])
    car.put(key, np.array([0, 0, 0, 0, 0]))  # a rescore replaces, never duplicates
    np.testing.assert_array_equal(car.get(key), [0] * 5)
    np.testing.assert_array_equal(car.labels(), [0, 1, 2, -1, 4])
    assert not [p for p in car.dir.iterdir() if p.name.endswith(".tmp")]


def test_another_subset_is_refused(tmp_path):
    car = PredictionSidecar(tmp_path / "scores.csv")
    car.open(_meta(), np.zeros(5))
    car.open(_meta(), np.zeros(5))  # the same subset continues
    with pytest.raises(ValfreeError, match="another training subset.*seed"):
        car.open(_meta(seed=1), np.zeros(5))


def test_non_utf8_keys_get_safe_names():
    name = key_name((b"run/\xff\xfe.pt".decode("utf-8", "surrogateescape"), "1", "2"))
    assert name.endswith(".npy") and name.isascii() and "/" not in name


def test_hostile_files_are_ignored_not_loaded(tmp_path):
    car = PredictionSidecar(tmp_path / "scores.csv")
    car.open(_meta(), np.zeros(5))
    key = ("a.pt", "1", "1.0")
    path = car.dir / key_name(key)
    np.save(path, np.array([object()], dtype=object), allow_pickle=True)  # a pickle inside .npy
    assert car.get(key) is None
    path.write_bytes(b"\x93NUMPY" + b"\x00" * 10_000_000)  # far larger than the subset allows
    assert car.get(key) is None
    np.save(path, np.zeros(7, dtype=np.int16))  # wrong length
    assert car.get(key) is None
    car.meta_path.write_text(json.dumps({"size": "huge"}))
    with pytest.raises(ValfreeError, match="does not describe a subset"):
        car.get(key)
