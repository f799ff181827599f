import os
import pickle

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import valfree
from valfree.io.checkpoints import discover_checkpoints, load_into, load_state_dict, step_from_name


def small():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


@pytest.mark.parametrize("name,step", [("step_000120.pt", 120), ("epoch=3-step=1200.ckpt", 1200),
                                       ("checkpoint-500", 500), ("model_epoch_7.pth", 7), ("ckpt0042.safetensors", 42),
                                       ("final.pt", None)])
def test_step_from_name(name, step):
    assert step_from_name(name) == step


def test_formats_load_the_same_weights(tmp_path):
    model = small()
    sd = model.state_dict()
    torch.save(sd, tmp_path / "a.pt")
    torch.save({"epoch": 3, "model_state_dict": sd, "optimizer": {"lr": 0.1}}, tmp_path / "b.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "c.safetensors")
    torch.save({"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 1, "global_step": 10}, tmp_path / "d.ckpt")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "e.bin")
    x = torch.randn(5, 3)
    for name in ("a.pt", "b.pth", "c.safetensors", "d.ckpt", "e.bin"):
        fresh = small()
        load_into(fresh, tmp_path / name)
        assert torch.equal(fresh(x), model(x)), name


def test_lightning_checkpoint_with_hyperparameters(tmp_path):
    import lightning
    from lightning.fabric.utilities.data import AttributeDict

    model = small()
    torch.save({"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
                "hyper_parameters": AttributeDict(lr=0.1), "pytorch-lightning_version": lightning.__version__},
               tmp_path / "epoch=0-step=5.ckpt")
    fresh = small()
    load_into(fresh, tmp_path / "epoch=0-step=5.ckpt")
    assert torch.equal(fresh[0].weight, model[0].weight)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_arbitrary_pickle_is_refused_with_a_conversion_hint(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weights": small().state_dict(), "payload": Evil()}, path)
    with pytest.raises(valfree.ValfreeError, match="arbitrary unpickling.*convert it once"):
        load_state_dict(path)
    whole = tmp_path / "whole_model.pt"
    torch.save(small(), whole)
    with pytest.raises(valfree.ValfreeError, match="arbitrary unpickling"):
        load_state_dict(whole)


def test_missing_and_unexpected_keys_are_named(tmp_path):
    sd = small().state_dict()
    sd.pop("2.bias")
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "bad.pt")
    with pytest.raises(valfree.ValfreeError, match=r"missing keys 2\.bias and unexpected keys extra\.weight"):
        load_into(small(), tmp_path / "bad.pt")


def test_shape_mismatch_is_named(tmp_path):
    torch.save(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 5)).state_dict(), tmp_path / "wide.pt")
    with pytest.raises(valfree.ValfreeError, match=r"shape mismatch in 2\.weight \(5, 4\) vs \(2, 4\)"):
        load_into(small(), tmp_path / "wide.pt")


def test_corrupt_file_is_a_clear_error(tmp_path):
    (tmp_path / "x.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(valfree.ValfreeError, match="not a readable torch checkpoint"):
        load_state_dict(tmp_path / "x.pt")
    (tmp_path / "y.safetensors").write_bytes(b"garbage")
    with pytest.raises(valfree.ValfreeError, match="not a readable safetensors"):
        load_state_dict(tmp_path / "y.safetensors")


def test_discover_orders_by_step_and_falls_back_to_mtime(tmp_path):
    for step in (30, 5, 100):
        torch.save({}, tmp_path / f"step_{step}.pt")
    refs, note = discover_checkpoints(tmp_path)
    assert [r.step for r in refs] == [5, 30, 100] and note is None
    torch.save({}, tmp_path / "final.pt")
    os.utime(tmp_path / "final.pt", (1e9, 1e9))
    refs, note = discover_checkpoints(tmp_path)
    assert "modification time" in note and refs[0].path.endswith("final.pt") and refs[0].step == 0
    refs, _ = discover_checkpoints(str(tmp_path / "step_*.pt"))
    assert len(refs) == 3


def test_discover_empty_folder_and_missing_path(tmp_path):
    with pytest.raises(valfree.ValfreeError, match="holds no checkpoint"):
        discover_checkpoints(tmp_path)
    with pytest.raises(valfree.ValfreeError, match="does not exist"):
        discover_checkpoints(tmp_path / "nope")
    with pytest.raises(valfree.ValfreeError, match="matches no file"):
        discover_checkpoints(str(tmp_path / "*.pt"))
