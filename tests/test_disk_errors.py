"""A failed checkpoint write (disk full, I/O error) at any point of the save leaves the
previous checkpoint intact and loadable, removes the partial file, stops with one line
naming the path and the bytes needed; a resume continues from the last good checkpoint."""

from __future__ import annotations

import errno
import os
import sys

import pytest
import torch
from test_trainer import make_trainer

from pipeline import atomic
from pipeline import checkpoint as ckpt


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def torch_save_half_then_full(obj, f):
    """torch.save that writes part of the file, then finds the disk full."""
    f.write(b"PK\x03\x04" + b"\0" * 4096)
    enospc()


REAL_FSYNC = os.fsync


def eio_fsync(fd):
    """An I/O error when a checkpoint's temporary file is synced to disk."""
    if ".pt." in os.readlink(f"/proc/self/fd/{fd}"):
        raise OSError(errno.EIO, os.strerror(errno.EIO))
    return REAL_FSYNC(fd)


REAL_REPLACE = os.replace


def replace_fails_for_last(src, dst):
    """The rename of a checkpoint's temporary file into place fails."""
    if str(src).endswith(".tmp") and ".pt." in str(src):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return REAL_REPLACE(src, dst)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
@pytest.mark.parametrize("where, target, fault, why", [
    ("serialization", "pipeline.checkpoint.torch.save", torch_save_half_then_full,
     "No space left on device"),
    ("fsync", "pipeline.atomic.os.fsync", eio_fsync, "Input/output error"),
    ("rename into place", "pipeline.atomic.os.replace", replace_fails_for_last,
     "No space left on device"),
], ids=["while-writing", "at-fsync", "at-rename"])
def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where, target,
                                                    fault, why):
    make_trainer(tmp_path, steps=3, epochs=1).fit()  # a good checkpoint of epoch 1
    good = ckpt.load(tmp_path / "last.pt")
    before = {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")}
    trainer = make_trainer(tmp_path, steps=3, epochs=3)
    monkeypatch.setattr(target, fault)
    with pytest.raises(ckpt.CheckpointWriteError) as err:
        trainer.fit()
    monkeypatch.undo()
    message = str(err.value)
    assert "\n" not in message and why in message, where
    assert str(tmp_path) in message and "needs about" in message
    needed = int(message.split("needs about ")[1].split(" bytes")[0].replace(",", ""))
    assert needed >= sum(v.numel() * v.element_size() for v in good["state_dict"].values())
    # the previous files intact and loadable, no partial file left
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.pt")} == before
    assert ckpt.load(tmp_path / "last.pt")["global_step"] == 3
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    # a resume continues from the last good checkpoint and finishes
    resumed = make_trainer(tmp_path, steps=3, epochs=3)
    assert resumed.try_resume() and resumed.global_step == 3
    resumed.fit()
    assert ckpt.load(tmp_path / "last.pt")["global_step"] == 9


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/fd")
def test_cli_disk_full_is_one_line_and_resumes(tiny_config, cli, tmp_path, monkeypatch):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 2}}})
    calls = []
    real = atomic.os.fsync

    def full_after_first_checkpoint(fd):
        if ".pt." in os.readlink(f"/proc/self/fd/{fd}"):
            calls.append(fd)
            if len(calls) > 1:  # the first checkpoint went through
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr("pipeline.atomic.os.fsync", full_after_first_checkpoint)
    code, _, err = cli("run", cfg, "--stage", "pretrain")
    monkeypatch.undo()
    assert code == 1 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("error:")]
    assert "No space left on device" in line and "needs about" in line
    stage = tmp_path / "runs" / "tiny" / "pretrain"
    assert ckpt.load(stage / "last.pt")["epoch"] == 1
    code, _, err = cli("run", cfg, "--stage", "pretrain")
    assert code == 0, err
    assert "resumed from" in err and torch.isfinite(
        ckpt.load(stage / "model.pt")["state_dict"]["fc.weight"]).all()
