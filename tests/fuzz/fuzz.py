"""Seeded fuzzing of checkpoint loading: mutated and hostile files of every format valfree reads.

    python -m tests.fuzz.fuzz --count 2000 --seed 1

Builds valid files (torch zip and legacy ``.pt``, ``.safetensors``, a Lightning ``.ckpt`` dict, a
``.pth`` training dict, Hugging Face folders single and sharded), mutates them (truncations, bit
flips, overwritten spans, zip and safetensors header corruptions, config.json mutations, missing
files) or replaces them by hostile ones (live ``__reduce__`` payloads, huge allowed objects, declared
sizes beyond the file, deflated bombs), and loads each through the public functions. Prints one JSON
line of counts. It fails (exit 1) on any exception that is not a :class:`valfree.ValfreeError` (it
would be a traceback), a load that takes longer than a few seconds, an executed payload, or peak
memory above ``--max-rss-mb`` beyond what the process held after building the valid files.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import warnings
import zipfile
from pathlib import Path

import torch

from tests.fuzz.craft import (
    BigAllowed,
    BigTensorCtor,
    LivePayload,
    deflated_bomb,
    hf_folder,
    legacy_declaring,
    safetensors_bytes,
    save_pt,
    small_model,
    torch_zip_declaring,
)

LOAD_SECONDS = 20


def build_bases(root: Path) -> dict[str, Path]:
    from lightning.fabric.utilities.data import AttributeDict
    from safetensors.torch import save_file

    sd = small_model().state_dict()
    bases = {}
    bases["zip.pt"] = root / "base_zip.pt"
    torch.save(sd, bases["zip.pt"])
    bases["legacy.pt"] = root / "base_legacy.pt"
    torch.save(sd, bases["legacy.pt"], _use_new_zipfile_serialization=False)
    bases["st.safetensors"] = root / "base.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, bases["st.safetensors"])
    bases["lightning.ckpt"] = root / "base_lightning.ckpt"
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1, "global_step": 10,
                "hyper_parameters": AttributeDict(lr=0.1), "optimizer_states": [{"state": {}, "param_groups": []}]},
               bases["lightning.ckpt"])
    bases["train.pth"] = root / "base_train.pth"
    torch.save({"epoch": 3, "model_state_dict": sd, "optimizer": {"lr": 0.1}}, bases["train.pth"])
    bases["hf"] = root / "base_hf" / "checkpoint-1"
    hf_folder(bases["hf"])
    bases["hf_sharded"] = root / "base_hf_sharded" / "checkpoint-2"
    hf_folder(bases["hf_sharded"], shards=3)
    return bases


# ------------------------------------------------------------------------------------- byte mutations


def truncate(rng: random.Random, raw: bytes) -> bytes:
    return raw[: rng.randrange(0, max(len(raw), 1))]


def flip_bits(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    for _ in range(rng.choice([1, 1, 1, 2, 4, 8])):
        if b:
            b[rng.randrange(len(b))] ^= 1 << rng.randrange(8)
    return bytes(b)


def overwrite(rng: random.Random, raw: bytes) -> bytes:
    b = bytearray(raw)
    if b:
        start = rng.randrange(len(b))
        n = rng.randint(1, 64)
        b[start:start + n] = bytes(rng.randrange(256) for _ in range(min(n, len(b) - start)))
    return bytes(b)


def zip_header(rng: random.Random, raw: bytes) -> bytes:
    """Corrupt one field of a central-directory or local header (sizes, offsets, lengths, attributes)."""
    b = bytearray(raw)
    sigs = [i for i in range(len(b) - 4) if b[i:i + 2] == b"PK" and b[i + 2:i + 4] in (b"\x01\x02", b"\x03\x04", b"\x05\x06")]
    if not sigs:
        return flip_bits(rng, raw)
    pos = rng.choice(sigs)
    off = pos + rng.randrange(4, 46)
    width = rng.choice([1, 2, 4])
    value = rng.choice([0, 0xFF, 0xFFFF, 0xFFFFFFFF, rng.randrange(1 << (8 * width))]) & ((1 << (8 * width)) - 1)
    b[off:off + width] = value.to_bytes(width, "little")[: len(b[off:off + width])]
    return bytes(b)


def safetensors_header(rng: random.Random, raw: bytes) -> bytes:
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    data = raw[8 + n:]
    choice = rng.randrange(6)
    if choice == 0:
        return struct.pack("<Q", rng.choice([0, n + 1, n * 1000, 1 << 40, (1 << 64) - 1])) + raw[8:]
    key = rng.choice([k for k in header if k != "__metadata__"])
    if choice == 1:
        header[key]["shape"] = [rng.choice([0, 1, 1 << 20, 1 << 40, -1]) for _ in range(rng.randint(0, 3))]
    elif choice == 2:
        header[key]["data_offsets"] = [rng.randrange(0, 1 << 32), rng.randrange(0, 1 << 40)]
    elif choice == 3:
        header[key]["dtype"] = rng.choice(["F64", "I8", "XX", 3, None])
    elif choice == 4:
        header[key] = rng.choice([None, [], "x", {"dtype": "F32"}])
    else:
        return safetensors_bytes(header, data, header_len=rng.choice([len(json.dumps(header)) - 1, 7]))
    return safetensors_bytes(header, data)


# ------------------------------------------------------------------------------------------- cases


def hostile_file(rng: random.Random, path: Path, marker: str) -> str:
    kind = rng.randrange(9)
    legacy = rng.random() < 0.3
    if kind == 0:
        save_pt(path, {"w": torch.zeros(2), "x": LivePayload(marker)}, legacy=legacy)
        return "live-payload"
    if kind == 1:
        save_pt(path, {"w": torch.zeros(2), "x": BigAllowed(rng.choice([2**21, 2**28, 2**31, 2**40]))}, legacy=legacy)
        return "big-bytearray"
    if kind == 2:
        save_pt(path, {"w": torch.zeros(2), "x": BigTensorCtor(rng.choice([2**12, 2**15]), rng.choice([2**12, 2**15]))}, legacy=legacy)
        return "big-tensor-ctor"
    if kind == 3:
        torch_zip_declaring(path, numel=rng.choice([4, 8, 2**20, 2**30, 2**40]), record_bytes=rng.choice([0, 16, 32]))
        return "zip-declared-storage"
    if kind == 4:
        size = tuple(rng.choice([1, 4, 2**10, 2**20]) for _ in range(rng.randint(1, 3)))
        stride = tuple(rng.choice([0, 1, 4, 2**10, -1]) for _ in size)
        torch_zip_declaring(path, numel=4, size=size, stride=stride, offset=rng.choice([0, 1, 3, -1, 2**20]))
        return "zip-view"
    if kind == 5:
        legacy_declaring(path, numel=rng.choice([4, 2**16, 2**30]), data_bytes=rng.choice([0, 16, 64]))
        return "legacy-declared-storage"
    if kind == 6 and rng.random() < 0.25:
        deflated_bomb(path, rng.choice([300, 600]) << 20)
        return "deflated-bomb"
    if kind == 7:
        # A live payload hidden where Lightning keeps hyper-parameters.
        save_pt(path, {"state_dict": small_model().state_dict(), "hyper_parameters": {"x": LivePayload(marker)}}, legacy=legacy)
        return "lightning-payload"
    save_pt(path, small_model(), legacy=legacy)  # a whole pickled module: refused
    return "whole-module"


def mutate_hf(rng: random.Random, folder: Path, marker: str) -> str:
    cfg_path = folder / "config.json"
    config = json.loads(cfg_path.read_text())
    kind = rng.randrange(10)
    if kind == 0:
        config["auto_map"] = {"AutoModel": "evil.EvilModel", "AutoConfig": "evil.EvilConfig"}
        if rng.random() < 0.5:
            config["model_type"], config["architectures"] = "evil-bert", ["EvilModel"]
        (folder / "evil.py").write_text(f"open({marker!r}, 'w').write('ran')\n")
        cfg_path.write_text(json.dumps(config))
        return "hf-auto_map"
    if kind == 1:
        config["architectures"] = [rng.choice(["AutoTokenizer", "pipeline", "PreTrainedModel", "os.system", "", "GPT2LMHeadModel",
                                               "BertModel", 7, None, "__class__", "EvilModel"])]
        cfg_path.write_text(json.dumps(config))
        return "hf-architectures"
    if kind == 2:
        config["model_type"] = rng.choice(["gpt2", "evil", "", None, 3, "bert"])
        cfg_path.write_text(json.dumps(config))
        return "hf-model_type"
    if kind == 3:
        key = rng.choice(["hidden_size", "num_hidden_layers", "intermediate_size", "vocab_size", "num_attention_heads",
                          "max_position_embeddings", "num_labels"])
        config[key] = rng.choice([0, -1, 3, 2**20, 2**31, 1.5, "x", None, [1]])
        cfg_path.write_text(json.dumps(config))
        return "hf-config-value"
    if kind == 4:
        raw = cfg_path.read_bytes()
        cfg_path.write_bytes(rng.choice([truncate, flip_bits, overwrite])(rng, raw))
        return "hf-config-bytes"
    if kind == 5:
        victim = rng.choice(sorted(p.name for p in folder.iterdir()))
        os.remove(folder / victim)
        return "hf-missing-file"
    if kind == 6:
        index = folder / "model.safetensors.index.json"
        if index.exists():
            data = json.loads(index.read_text())
            key = rng.choice(sorted(data["weight_map"]))
            data["weight_map"][key] = rng.choice(["../outside.safetensors", "/etc/passwd", "nope.safetensors", "config.json", ""])
            index.write_text(json.dumps(data))
            return "hf-index"
    weights = sorted(p for p in folder.iterdir() if p.suffix == ".safetensors")
    target = rng.choice(weights)
    raw = target.read_bytes()
    mutation = rng.choice([truncate, flip_bits, overwrite, safetensors_header])
    try:
        target.write_bytes(mutation(rng, raw))
    except Exception:
        target.write_bytes(flip_bits(rng, raw))
    return f"hf-weights-{mutation.__name__}"


def make_case(rng: random.Random, bases: dict[str, Path], work: Path, i: int, marker: str) -> tuple[Path, str, str]:
    """(path, kind, loader) of one fuzz case."""
    fmt = rng.choice(["zip.pt", "legacy.pt", "st.safetensors", "lightning.ckpt", "train.pth", "hf", "hf_sharded", "hostile"])
    if fmt in ("hf", "hf_sharded"):
        folder = work / f"run{i}" / f"checkpoint-{i}"
        shutil.copytree(bases[fmt], folder)
        return folder, f"{fmt}:{mutate_hf(rng, folder, marker)}", rng.choice(["hf", "hf", "state"])
    suffix = Path(fmt).suffix
    path = work / f"case{i}{suffix}"
    if fmt == "hostile":
        path = work / f"case{i}.pt"
        return path, "hostile:" + hostile_file(rng, path, marker), "state"
    raw = bases[fmt].read_bytes()
    mutations = [truncate, flip_bits, flip_bits, overwrite]
    if raw[:4] == b"PK\x03\x04":
        mutations.append(zip_header)
    if suffix == ".safetensors":
        mutations += [safetensors_header, safetensors_header]
    mutation = rng.choice(mutations)
    path.write_bytes(mutation(rng, raw))
    return path, f"{fmt}:{mutation.__name__}", rng.choice(["state", "into"])


class _Timeout(Exception):
    pass


def _alarm(*_):
    raise _Timeout()


def run(count: int, seed: int, max_rss_mb: float, keep: str | None = None) -> dict:
    warnings.simplefilter("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    import valfree
    from valfree.io.checkpoints import load_into, load_state_dict
    from valfree.io.hf_model import build_hf_model

    rng = random.Random(seed)
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="valfree-fuzz-"))
    root.mkdir(parents=True, exist_ok=True)
    marker = str(root / "PAYLOAD_RAN")
    bases = build_bases(root)
    # Warm up every loader on the valid files, so the baseline already holds what loading legitimately needs.
    for name, base in bases.items():
        (build_hf_model(base) if name.startswith("hf") else load_state_dict(base))
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    counts: dict[str, int] = {}
    kinds: dict[str, int] = {}
    failures: list[dict] = []
    slowest = 0.0
    notable: list[dict] = []
    last_peak = baseline
    started = time.time()
    signal.signal(signal.SIGALRM, _alarm)
    for i in range(count):
        work = root / f"w{i}"
        work.mkdir()
        try:
            path, kind, loader = make_case(rng, bases, work, i, marker)
        except Exception as exc:  # a generator bug is not a finding; record it apart
            counts["generator-error"] = counts.get("generator-error", 0) + 1
            failures.append({"case": i, "kind": "generator", "error": f"{type(exc).__name__}: {exc}"[:300]})
            continue
        kinds[kind.split(":")[0]] = kinds.get(kind.split(":")[0], 0) + 1
        t = time.time()
        signal.alarm(LOAD_SECONDS)
        try:
            if loader == "hf":
                build_hf_model(path)
            elif loader == "into":
                load_into(small_model(), path, strict=False)
            else:
                load_state_dict(path)
            outcome = "loaded"
        except valfree.ValfreeError as exc:
            outcome = type(exc).__name__
            message = str(exc)
            if "\n" in message:
                failures.append({"case": i, "kind": kind, "error": "multi-line message: " + message[:300]})
        except _Timeout:
            outcome = "TIMEOUT"
            failures.append({"case": i, "kind": kind, "error": f"load took over {LOAD_SECONDS} s"})
        except BaseException as exc:  # anything else would reach the user as a traceback
            outcome = "TRACEBACK"
            failures.append({"case": i, "kind": kind, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
        finally:
            signal.alarm(0)
        took = time.time() - t
        slowest = max(slowest, took)
        now = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if now - last_peak > 50 or took > 2:
            notable.append({"case": i, "kind": kind, "outcome": outcome, "raised_peak_mb": round(now - last_peak),
                            "seconds": round(took, 2)})
        last_peak = now
        counts[outcome] = counts.get(outcome, 0) + 1
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    payload_ran = os.path.exists(marker)
    if payload_ran:
        failures.append({"case": None, "kind": "payload", "error": "a hostile payload ran"})
    grew = peak - baseline
    if grew > max_rss_mb:
        failures.append({"case": None, "kind": "memory", "error": f"peak memory grew {grew:.0f} MB (bound {max_rss_mb} MB)"})
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return {
        "files": count, "seed": seed, "outcomes": dict(sorted(counts.items())), "formats": dict(sorted(kinds.items())),
        "failures": failures, "payload_ran": payload_ran, "baseline_rss_mb": round(baseline), "peak_rss_mb": round(peak),
        "peak_growth_mb": round(grew), "max_rss_growth_mb": max_rss_mb, "slowest_load_s": round(slowest, 2), "notable": notable[:20],
        "seconds": round(time.time() - started, 1),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=int(os.environ.get("FUZZ_COUNT", 200)))
    parser.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", 0)))
    parser.add_argument("--max-rss-mb", type=float, default=400.0, help="bound on peak memory growth during the run")
    parser.add_argument("--keep", default=None, help="keep every generated file under this folder")
    args = parser.parse_args(argv)
    result = run(args.count, args.seed, args.max_rss_mb, args.keep)
    print(json.dumps(result))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
