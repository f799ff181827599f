"""Untrusted checkpoints: no code runs, memory stays bounded, corruption and incompleteness are named.

Loads that might hang or allocate gigabytes run in a subprocess with a timeout, which also measures
their peak memory (ru_maxrss) against the memory they held before loading.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

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
from valfree.errors import (
    CheckpointError,
    CheckpointTooLarge,
    IncompleteCheckpoint,
    NonFiniteWeights,
    UnsafeCheckpoint,
    ValfreeError,
)
from valfree.io.checkpoints import discover_checkpoints, load_into, load_state_dict, shell_quote

REPO = Path(__file__).resolve().parents[2]
# Loading a refused file may hold at most this much beyond what the process held before.
MEMORY_SLACK_MB = 200


def run_py(code: str, timeout: float = 120, env_extra: dict | None = None, stdin=subprocess.DEVNULL) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line, which is returned."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, timeout=timeout,
                          env=env, cwd=REPO, stdin=stdin)
    out = proc.stdout.decode(errors="replace")
    lines = [ln[ln.index('{"'):] for ln in out.splitlines() if '{"' in ln]  # a prompt may precede it on its line
    assert lines, f"no result (rc {proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}"
    result = json.loads(lines[-1])
    result["stdout"] = out
    return result


LOAD_AND_MEASURE = """
import json, resource, sys, warnings
warnings.simplefilter("ignore")
import torch, valfree
from valfree.io.checkpoints import load_state_dict
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_state_dict({path!r})
    result = {{"error": None, "message": ""}}
except Exception as exc:
    result = {{"error": type(exc).__name__, "message": str(exc), "valfree": isinstance(exc, valfree.ValfreeError)}}
result["grew_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps(result))
"""


def load_in_subprocess(path) -> dict:
    return run_py(LOAD_AND_MEASURE.format(path=str(path)))


def one_sentence(message: str) -> bool:
    body = message.rstrip(".")
    return "\n" not in message and message.endswith(".") and ". " not in body.replace("e.g. ", "")


# --- memory amplification ---------------------------------------------------------------------------


def test_small_pickle_asking_for_a_huge_bytearray_is_refused_without_allocating(tmp_path):
    path = tmp_path / "tiny.pt"
    save_pt(path, {"w": torch.zeros(2), "x": BigAllowed(2**31)})
    assert path.stat().st_size < 4096
    result = load_in_subprocess(path)
    assert result["error"] == "CheckpointTooLarge", result
    assert "bytearray" in result["message"] and one_sentence(result["message"])
    assert result["grew_mb"] < MEMORY_SLACK_MB, result


def test_deflated_storage_bomb_is_refused_without_decompressing(tmp_path):
    path = tmp_path / "bomb.pt"
    deflated_bomb(path, 600 << 20)
    assert path.stat().st_size < 2 << 20
    result = load_in_subprocess(path)
    assert result["error"] == "CheckpointTooLarge", result
    assert "decompress" in result["message"] and one_sentence(result["message"])
    assert result["grew_mb"] < MEMORY_SLACK_MB, result


@pytest.mark.parametrize("make", [
    lambda p: save_pt(p, {"w": torch.zeros(2), "x": BigTensorCtor(2**15, 2**15)}),
    lambda p: save_pt(p, {"w": torch.zeros(2), "x": BigAllowed(2**31)}, legacy=True),
    lambda p: torch_zip_declaring(p, numel=2**30),
    lambda p: torch_zip_declaring(p, numel=4, size=(2**20, 2**20), stride=(1, 1)),
    lambda p: legacy_declaring(p, numel=2**30),
], ids=["tensor-ctor", "legacy-bytearray", "zip-declared-storage", "zip-huge-view", "legacy-declared-storage"])
def test_declared_sizes_are_bounded_before_loading(tmp_path, make):
    path = tmp_path / "x.pt"
    make(path)
    with pytest.raises(CheckpointTooLarge) as info:
        load_state_dict(path)
    assert one_sentence(str(info.value))


def test_views_beyond_their_storage_and_short_records_are_refused(tmp_path):
    torch_zip_declaring(tmp_path / "view.pt", numel=4, size=(4, 4), stride=(4, 1))
    with pytest.raises(CheckpointError, match="reaches beyond its storage"):
        load_state_dict(tmp_path / "view.pt")
    torch_zip_declaring(tmp_path / "short.pt", numel=8, record_bytes=16)
    with pytest.raises(CheckpointError, match="declares 32 bytes but holds 16"):
        load_state_dict(tmp_path / "short.pt")
    legacy_declaring(tmp_path / "legacy.pt", numel=1 << 16, data_bytes=16)
    with pytest.raises(CheckpointError):
        load_state_dict(tmp_path / "legacy.pt")


def test_budget_is_overridable_and_scales_with_the_model(tmp_path):
    model = small_model()
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    with pytest.raises(CheckpointTooLarge, match="budget"):
        load_state_dict(tmp_path / "ok.pt", max_bytes=64)
    assert set(load_state_dict(tmp_path / "ok.pt", max_bytes=1 << 20)) == set(model.state_dict())
    load_into(small_model(), tmp_path / "ok.pt", max_bytes=1 << 20)


def test_safetensors_header_and_extents_are_checked_against_the_file(tmp_path):
    cases = {
        "long_header.safetensors": safetensors_bytes({}, b"", header_len=1 << 40),
        "beyond.safetensors": safetensors_bytes({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 30]}}, bytes(16)),
        "shape.safetensors": safetensors_bytes({"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 16]}}, bytes(16)),
        "short.safetensors": b"\x01\x02",
    }
    for name, raw in cases.items():
        (tmp_path / name).write_bytes(raw)
        with pytest.raises(CheckpointError, match="not a readable safetensors file") as info:
            load_state_dict(tmp_path / name)
        assert one_sentence(str(info.value)), name


# --- corruption -------------------------------------------------------------------------------------


def test_bit_flipped_storage_fails_instead_of_loading_altered_weights(tmp_path):
    model = small_model()
    path = tmp_path / "flip.pt"
    torch.save(model.state_dict(), path)
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("/data/0"))
    raw = bytearray(path.read_bytes())
    import struct

    n, e = struct.unpack("<HH", raw[info.header_offset + 26: info.header_offset + 30])  # the local header's own lengths
    start = info.header_offset + 30 + n + e
    raw[start + 5] ^= 0x01
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_state_dict(path)


def test_zip_member_marked_as_folder_is_refused(tmp_path):
    path = tmp_path / "attr.pt"
    torch.save(small_model().state_dict(), path)
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        cd = z.start_dir
    # The MS-DOS folder bit in the central directory entry of the first storage record.
    import struct

    pos = cd
    while True:
        n, e, c = struct.unpack("<HHH", raw[pos + 28: pos + 34])
        if raw[pos + 46: pos + 46 + n].endswith(b"data/0"):
            break
        pos += 46 + n + e + c
    raw[pos + 38] ^= 0x10
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError):
        load_state_dict(path)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_their_own_error(tmp_path, value):
    sd = small_model().state_dict()
    sd["2.weight"][0, 0] = value
    torch.save(sd, tmp_path / "diverged.pt")
    model = small_model()
    before = model[2].weight.detach().clone()
    with pytest.raises(NonFiniteWeights, match=r"non-finite weights \(NaN or inf\) in 2\.weight") as info:
        load_into(model, tmp_path / "diverged.pt")
    assert info.value.names == ["2.weight"] and one_sentence(str(info.value))
    assert torch.equal(model[2].weight, before)  # the model was not touched
    with pytest.raises(NonFiniteWeights):
        load_state_dict(tmp_path / "diverged.pt", check_finite=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "diverged.safetensors")
    with pytest.raises(NonFiniteWeights):
        load_into(small_model(), tmp_path / "diverged.safetensors")


def test_minus_inf_mask_buffers_are_legitimate():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.register_buffer("mask", torch.tensor([0.0, float("-inf")]))

    state = Masked().state_dict()
    load_into(Masked(), state)
    state["mask"] = torch.tensor([float("nan"), 0.0])
    with pytest.raises(NonFiniteWeights):
        load_into(Masked(), state)


# --- names in hints ---------------------------------------------------------------------------------

HOSTILE_NAMES = ["it's here.pt", "$(touch MARKER).pt", "a b `touch MARKER`.pt", "x'+__import__('os').system('touch MARKER')+'.pt"]


@pytest.mark.parametrize("name", HOSTILE_NAMES + ["non-utf8-\udcff\udcfe.pt"])
def test_refusal_hint_quotes_the_file_name_and_its_command_is_safe_to_paste(tmp_path, name):
    folder = tmp_path / "d"
    folder.mkdir()
    path = folder / name
    torch.save(small_model(), path)  # a whole pickled module: refused, with the conversion hint
    with pytest.raises(UnsafeCheckpoint) as info:
        load_state_dict(path)
    message = str(info.value)
    message.encode("utf-8")  # printable on any UTF-8 terminal: no raw surrogates
    assert one_sentence(message.replace("e.g. ", "")) or "convert it once" in message
    command = message.split("convert it once with ", 1)[1].rsplit(" and score the .weights.pt file.", 1)[0]
    assert command.endswith(shell_quote(path))
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(["bash", "-c", command.replace("python -c", shlex.quote(sys.executable) + " -c", 1)],
                          cwd=folder, env=env, capture_output=True, timeout=120)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-1000:]
    assert not (folder / "MARKER").exists()
    assert os.path.exists(os.fsencode(str(path) + ".weights.pt"))


def test_messages_quote_hostile_names(tmp_path):
    path = tmp_path / "bad\nname $(x).pt"
    path.write_bytes(b"garbage")
    with pytest.raises(CheckpointError) as info:
        load_state_dict(path)
    assert repr(str(path)) in str(info.value) and "\n" not in str(info.value)


# --- code execution ---------------------------------------------------------------------------------


def test_live_reduce_payload_never_runs(tmp_path):
    marker = tmp_path / "ran"
    for legacy in (False, True):
        path = tmp_path / f"evil{legacy}.pt"
        save_pt(path, {"w": torch.zeros(1), "x": LivePayload(str(marker))}, legacy=legacy)
        with pytest.raises(UnsafeCheckpoint):
            load_state_dict(path)
    assert not marker.exists()


BUILD_HF = """
import json, sys, time, warnings
warnings.simplefilter("ignore")
import valfree
try:
    from valfree.io.hf_model import build_hf_model
except ImportError:
    from valfree.io.scoring import build_hf_model
t = time.time()
try:
    build_hf_model({path!r})
    result = {{"error": None}}
except Exception as exc:
    result = {{"error": type(exc).__name__, "message": str(exc), "valfree": isinstance(exc, valfree.ValfreeError)}}
result["seconds"] = time.time() - t
print(json.dumps(result))
"""


@pytest.mark.parametrize("answer", [None, b"y\n"], ids=["silent-stdin", "stdin-yes"])
def test_auto_map_is_refused_without_prompt_or_code(tmp_path, answer):
    folder = tmp_path / "run" / "checkpoint-5"
    marker = tmp_path / "ran"
    hf_folder(folder, {"model_type": "evil-bert", "architectures": ["EvilModel"],
                       "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModel": "evil.EvilModel"}})
    (folder / "evil.py").write_text(textwrap.dedent(f"""
        open({str(marker)!r}, "w").write("ran")
        from transformers import BertConfig, BertModel
        class EvilConfig(BertConfig):
            model_type = "evil-bert"
        class EvilModel(BertModel):
            config_class = EvilConfig
    """))
    if answer is None:  # a stdin that stays open and never answers
        read_end, write_end = os.pipe()
        try:
            result = run_py(BUILD_HF.format(path=str(folder)), timeout=60, stdin=read_end)
        finally:
            os.close(read_end)
            os.close(write_end)
    else:
        stdin_file = tmp_path / "yes"
        stdin_file.write_bytes(answer * 10)
        with open(stdin_file, "rb") as fh:
            result = run_py(BUILD_HF.format(path=str(folder)), timeout=60, stdin=fh)
    assert not marker.exists()
    assert "[y/N]" not in result["stdout"], result  # no prompt
    assert result["error"] == "UnsafeCheckpoint" and "auto_map" in result["message"], result
    assert one_sentence(result["message"]) and result["seconds"] < 5


@pytest.mark.parametrize("arch", ["AutoTokenizer", "pipeline", "PreTrainedModel", "os.system", 42])
def test_architectures_must_name_a_transformers_model_class(tmp_path, arch):
    folder = tmp_path / "checkpoint-1"
    hf_folder(folder, {"architectures": [arch]})
    result = run_py(BUILD_HF.format(path=str(folder)), timeout=120)
    assert result["error"] == "UnsafeCheckpoint", result
    assert "names no model class transformers knows" in result["message"] and one_sentence(result["message"])


def test_config_declaring_a_model_far_larger_than_its_weights_is_refused(tmp_path):
    folder = tmp_path / "checkpoint-1"
    hf_folder(folder, {"hidden_size": 8192, "intermediate_size": 32768, "num_hidden_layers": 8, "num_attention_heads": 8})
    from valfree.io.hf_model import build_hf_model

    with pytest.raises(CheckpointTooLarge, match="declares a BertForSequenceClassification of"):
        build_hf_model(folder)


def test_known_hf_checkpoints_load_single_and_sharded(tmp_path):
    from transformers import BertForSequenceClassification

    from valfree.io.hf_model import build_hf_model

    for name, shards in (("checkpoint-1", 1), ("checkpoint-2", 3)):
        hf_folder(tmp_path / name, shards=shards)
        if shards > 1:
            assert (tmp_path / name / "model.safetensors.index.json").exists()
        model = build_hf_model(tmp_path / name)
        torch.manual_seed(0)
        assert isinstance(model, BertForSequenceClassification)
        ref = load_state_dict(tmp_path / name)
        assert all(torch.equal(model.state_dict()[k], v) for k, v in ref.items())


# --- incomplete folders -----------------------------------------------------------------------------


def make_incomplete_run(run: Path) -> None:
    hf_folder(run / "checkpoint-1")
    hf_folder(run / "checkpoint-2", weights=False)  # config only
    hf_folder(run / "checkpoint-3")
    (run / "checkpoint-3" / "config.json").unlink()  # weights only
    hf_folder(run / "checkpoint-4", shards=3)
    for f in (run / "checkpoint-4").glob("model-0*.safetensors"):
        f.unlink()  # only the index
    hf_folder(run / "checkpoint-5", shards=3)
    sorted((run / "checkpoint-5").glob("model-0*.safetensors"))[1].unlink()  # one shard missing
    (run / "checkpoint-6").mkdir()  # interrupted before anything was written


def test_incomplete_checkpoint_folders_are_returned_and_name_what_is_missing(tmp_path):
    from valfree.io.hf_model import build_hf_model

    run = tmp_path / "run"
    make_incomplete_run(run)
    refs, note = discover_checkpoints(run)
    assert [r.step for r in refs] == [1, 2, 3, 4, 5, 6] and note is None
    build_hf_model(run / "checkpoint-1")
    expected = {2: "holds no weights", 3: "has no config.json", 4: r"(\d+) of the \1 shards", 5: r"1 of the \d+ shards",
                6: "nothing at all"}
    for step, text in expected.items():
        with pytest.raises(IncompleteCheckpoint, match=text) as info:
            build_hf_model(run / f"checkpoint-{step}")
        assert one_sentence(str(info.value)), str(info.value)
    # With the user's own model, weights without a config are enough.
    assert set(load_state_dict(run / "checkpoint-3")) == set(load_state_dict(run / "checkpoint-1"))


def test_shard_index_pointing_outside_the_folder_is_refused(tmp_path):
    folder = tmp_path / "checkpoint-1"
    hf_folder(folder, shards=3)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = next(iter(index["weight_map"]))
    index["weight_map"][first] = "../../etc/passwd.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(UnsafeCheckpoint, match="outside its folder"):
        load_state_dict(folder)


def test_score_records_incomplete_folders_as_failed_rows(tmp_path, digits_trajectory):
    from valfree.cli import main

    folder, _ = digits_trajectory
    run = tmp_path / "run"
    shutil.copytree(folder, run)
    (run / "checkpoint-9999").mkdir()
    out = tmp_path / "s.csv"
    assert main(["score", str(run), "--model", "valfree.models:digits_cnn", "--data", "digits", "--out", str(out)]) == 1
    import csv

    table = list(csv.DictReader(open(out, newline="")))
    failed = [r for r in table if r["status"] != "ok"]
    assert len(failed) == 1 and failed[0]["path"].endswith("checkpoint-9999") and "holds no weights" in failed[0]["error"]
    assert sum(r["status"] == "ok" for r in table) == 12


# --- non-regular files ------------------------------------------------------------------------------

FIFO_RUN = """
import json, warnings
warnings.simplefilter("ignore")
from valfree.io.checkpoints import discover_checkpoints, load_state_dict
refs, note = discover_checkpoints({pattern!r})
loaded = []
for r in refs:
    try:
        load_state_dict(r.path); loaded.append(r.path)
    except Exception as exc:
        loaded.append(type(exc).__name__)
try:
    load_state_dict({fifo!r})
    direct = None
except Exception as exc:
    direct = type(exc).__name__
print(json.dumps({{"paths": [r.path for r in refs], "note": note, "loaded": loaded, "direct": direct}}))
"""


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs")
def test_fifo_matched_by_a_glob_is_skipped_without_opening_it(tmp_path):
    torch.save(small_model().state_dict(), tmp_path / "step_1.pt")
    os.mkfifo(tmp_path / "step_2.pt")
    result = run_py(FIFO_RUN.format(pattern=str(tmp_path / "step_*.pt"), fifo=str(tmp_path / "step_2.pt")), timeout=60)
    assert result["paths"] == [str(tmp_path / "step_1.pt")]
    assert "not a regular file" in result["note"] and "FIFO" in result["note"]
    assert result["direct"] == "CheckpointError"
    # Inside a folder too, and named explicitly it is one clear sentence.
    refs, _ = discover_checkpoints(tmp_path)
    assert [Path(r.path).name for r in refs] == ["step_1.pt"]
    with pytest.raises(ValfreeError, match="is a FIFO"):
        discover_checkpoints(tmp_path / "step_2.pt")


# --- determinism ------------------------------------------------------------------------------------

PREFIX_RUN = """
import json, warnings
warnings.simplefilter("ignore")
import torch
from torch import nn
from valfree.io.checkpoints import load_into
model = nn.Linear(2, 2)
load_into(model, {path!r})
print(json.dumps({{"w": float(model.weight.detach().sum())}}))
"""


def test_choice_between_prefixed_models_does_not_depend_on_the_hash_seed(tmp_path):
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    with torch.no_grad():
        a.weight.fill_(1.0)
        b.weight.fill_(2.0)
    state = {f"teacher.{k}": v for k, v in a.state_dict().items()}
    state.update({f"student.{k}": v for k, v in b.state_dict().items()})
    torch.save(state, tmp_path / "two.pt")
    seen = {run_py(PREFIX_RUN.format(path=str(tmp_path / "two.pt")), env_extra={"PYTHONHASHSEED": str(s)})["w"]
            for s in range(8)}
    assert seen == {8.0}, seen  # always 'student.', the alphabetically first of two equal candidates
    model = nn.Linear(2, 2)
    torch.save({f"model.{k}": v for k, v in a.state_dict().items()} | {f"ema.{k}": v for k, v in b.state_dict().items()},
               tmp_path / "ema.pt")
    load_into(model, tmp_path / "ema.pt")
    assert float(model.weight.detach().sum()) == 4.0  # 'model.' is preferred over another prefix
