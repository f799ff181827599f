"""Hostile and broken checkpoint files, built on purpose, for the security tests and the fuzz suite.

Every payload here is live: unpickled by a plain ``pickle.load`` it would write ``marker``. The tests
assert that the marker never appears.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pickle
import struct
import sys
import zipfile

import torch
from torch import nn


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


class LivePayload:
    """Writes ``marker`` when unpickled by anything that honours ``__reduce__``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


class BigAllowed:
    """An allowed global (bytearray) asked for a huge size: tiny file, huge allocation."""

    def __init__(self, n: int):
        self.n = n

    def __reduce__(self):
        return (bytearray, (self.n,))


class BigTensorCtor:
    """torch.Tensor.__new__ with bare sizes allocates prod(sizes) floats."""

    def __init__(self, *sizes: int):
        self.sizes = sizes

    def __reduce__(self):
        return (torch.FloatTensor, self.sizes)


def save_pt(path, obj, legacy: bool = False) -> None:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)


def deflated_bomb(path, nbytes: int, base=None) -> None:
    """A valid .pt whose first storage record is replaced by ``nbytes`` zeros, deflated (about 1000:1)."""
    base = base or io.BytesIO()
    if isinstance(base, io.BytesIO):
        torch.save(small_model().state_dict(), base)
        base.seek(0)
    with zipfile.ZipFile(base) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            if info.filename.endswith("/data/0"):
                with zout.open(info.filename, "w", force_zip64=True) as fh:
                    chunk = bytes(16 << 20)
                    left = nbytes
                    while left > 0:
                        fh.write(chunk[: min(left, len(chunk))])
                        left -= len(chunk)
            else:
                zout.writestr(info.filename, zin.read(info), compress_type=zipfile.ZIP_DEFLATED)


class _Storage:
    def __init__(self, key: str, numel: int):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage: _Storage, size, stride, offset: int = 0):
        self.storage, self.size, self.stride, self.offset = storage, tuple(size), tuple(stride), offset

    def __reduce__(self):
        return (torch._utils._rebuild_tensor_v2,
                (self.storage, self.offset, self.size, self.stride, False, collections.OrderedDict()))


class _TorchPickler(pickle.Pickler):
    legacy = False

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            pid = ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel)
            return pid + (None,) if self.legacy else pid  # the legacy format adds view metadata
        return None


def _pickle(obj, protocol: int = 2, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    pickler = _TorchPickler(buf, protocol=protocol)
    pickler.legacy = legacy
    pickler.dump(obj)
    return buf.getvalue()


def torch_zip_declaring(path, numel: int, record_bytes: int = 16, size=None, stride=None, offset: int = 0) -> None:
    """A torch zip whose pickle declares a float storage of ``numel`` elements backed by a ``record_bytes`` record,
    and one tensor viewing it with ``size``/``stride``/``offset``."""
    st = _Storage("0", numel)
    size = size if size is not None else (numel,)
    stride = stride if stride is not None else (1,)
    data = _pickle(collections.OrderedDict(w=_Tensor(st, size, stride, offset)))
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", data)
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/data/0", bytes(record_bytes))
        z.writestr("archive/version", "3\n")


def legacy_declaring(path, numel: int, data_bytes: int = 16) -> None:
    """The pre-zip torch format, its pickle declaring ``numel`` floats, its file holding ``data_bytes``."""
    st = _Storage("0", numel)
    with open(path, "wb") as f:
        pickle.dump(0x1950A86A20F9469CFC6C, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": sys.byteorder == "little",
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        f.write(_pickle(collections.OrderedDict(w=_Tensor(st, (numel,), (1,))), legacy=True))
        pickle.dump(["0"], f, protocol=2)
        f.write(struct.pack("<q", numel))
        f.write(bytes(data_bytes))


def safetensors_bytes(header: dict, data: bytes, header_len: int | None = None) -> bytes:
    raw = json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    return struct.pack("<Q", n) + raw + data


def hf_folder(path, config_overrides: dict | None = None, weights: bool = True, shards: int = 1) -> dict:
    """A tiny BERT classifier saved with save_pretrained; returns its config dict."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=40, hidden_size=8, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=16, max_position_embeddings=16, num_labels=3)
    model = BertForSequenceClassification(cfg)
    os.makedirs(path, exist_ok=True)
    if weights:
        kwargs = {"max_shard_size": "4KB"} if shards > 1 else {}
        model.save_pretrained(path, **kwargs)
    else:
        cfg.save_pretrained(path)
    config = json.loads(open(os.path.join(path, "config.json")).read())
    if config_overrides:
        config.update(config_overrides)
        with open(os.path.join(path, "config.json"), "w") as fh:
            json.dump(config, fh)
    return config
