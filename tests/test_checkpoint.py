"""Checkpoint files: atomic writes, corruption caught in one line, and the plain module
saved from under DDP and torch.compile (no `module.` / `_orig_mod.` prefixes), loadable
both ways."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

from pipeline import checkpoint as ckpt
from pipeline.models import build_model, load_model

ARCH = {"name": "resnet8", "num_classes": 4, "shortcut": "A"}


class FailsToSave:
    """Raises while being written, like a full disk half-way through torch.save."""

    def __reduce__(self):
        raise RuntimeError("disk full")


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = build_model(ARCH)
    path = tmp_path / "model.pt"
    ckpt.save_model(path, model, ARCH, {"stage": "pretrain"})
    return path, model


def test_roundtrip_and_digest(saved):
    path, model = saved
    payload = ckpt.load(path)
    assert "digest" not in payload and payload["meta"] == {"stage": "pretrain"}
    for k, v in model.state_dict().items():
        assert torch.equal(payload["state_dict"][k], v)
    assert not list(path.parent.glob(".*.tmp"))  # no temporary file left behind


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "empty"])
def test_damaged_file_is_one_line_checkpoint_error(saved, damage):
    path, _ = saved
    data = bytearray(path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":  # inside a tensor's bytes: torch.load alone would not notice
        data[len(data) // 2] ^= 0xFF
    elif damage == "garbage":
        data = bytearray(os.urandom(len(data)))
    else:
        data = bytearray()
    path.write_bytes(bytes(data))
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_not_a_checkpoint_or_newer_schema(tmp_path):
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(ckpt.CheckpointError, match="no schema"):
        ckpt.load(tmp_path / "plain.pt")
    ckpt.save({"schema": ckpt.SCHEMA_VERSION + 1}, tmp_path / "new.pt")
    with pytest.raises(ckpt.CheckpointError, match="newer"):
        ckpt.load(tmp_path / "new.pt")


def test_failed_write_keeps_the_old_file(saved):
    path, _ = saved
    before = path.read_bytes()
    with pytest.raises(RuntimeError, match="disk full"):
        ckpt.atomic_save({"schema": 1, "bad": FailsToSave()}, path)
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))


@pytest.fixture
def world_of_one(tmp_path):
    """A gloo process group of one process, so DDP can wrap a module in-process."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0,
                            world_size=1)
    yield
    dist.destroy_process_group()


def test_wrapped_models_save_the_plain_module(tmp_path, world_of_one):
    torch.manual_seed(0)
    plain = build_model(ARCH)
    ddp = nn.parallel.DistributedDataParallel(plain)
    wrapped = torch.compile(ddp)  # the trainer's order: DDP, then compile
    assert any(k.startswith("_orig_mod.module.") for k in wrapped.state_dict())
    assert ckpt.unwrap(wrapped) is plain
    ckpt.save_model(tmp_path / "model.pt", wrapped, ARCH)
    sd = ckpt.load(tmp_path / "model.pt")["state_dict"]
    assert set(sd) == set(plain.state_dict())
    # a DDP-written file loads into a plain single-process model ...
    reloaded = load_model(tmp_path / "model.pt")
    for k, v in plain.state_dict().items():
        assert torch.equal(reloaded.state_dict()[k], v)
    # ... and a single-process file into the module under a DDP wrapper, strictly
    other = build_model(ARCH)
    ddp_other = nn.parallel.DistributedDataParallel(other)
    ckpt.unwrap(ddp_other).load_state_dict(sd, strict=True)
    assert torch.equal(other.conv1.weight, plain.conv1.weight)


def test_weights_file_with_module_prefix(tmp_path):
    """Foreign weights saved from a DDP wrapper (torchvision-style scripts) load too."""
    model = build_model(ARCH)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "w.pth")
    sd = ckpt.load_weights_file(tmp_path / "w.pth")
    build_model(ARCH).load_state_dict(sd, strict=True)


def test_link_then_replace_leaves_the_other_name_intact(saved):
    """The trainer hard-links last.pt to best.pt; replacing last.pt later (a new file)
    must not change best.pt."""
    path, model = saved
    last = path.with_name("last.pt")
    assert ckpt.link(path, last)
    assert os.path.samefile(path, last)
    before = path.read_bytes()
    ckpt.save_model(last, build_model(ARCH), ARCH)
    assert path.read_bytes() == before and not os.path.samefile(path, last)
    assert not list(path.parent.glob(".*.tmp"))
