"""The trainer on its own (tiny resnet8, random 16 px batches held in memory) and through
the CLI: host syncs, bf16 on the CPU, corrupt and incompatible checkpoints, non-finite
losses, what a checkpoint holds, progress output."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from fakes import FakeLoader, random_batches

from pipeline import checkpoint as ckpt
from pipeline.config import ConfigError
from pipeline.distributed import DistInfo
from pipeline.models import build_model, load_model
from pipeline.trainer import (
    CallbackHook,
    HookBase,
    RunSettings,
    TrainConfig,
    Trainer,
    TrainingError,
    autocast_context,
    evaluate,
)

ARCH = {"name": "resnet8", "num_classes": 4, "shortcut": "A"}


pytestmark = pytest.mark.usefixtures("one_thread")


def make_trainer(out_dir: Path, steps: int = 4, model: nn.Module | None = None,
                 precision: str = "fp32", dist: DistInfo = DistInfo(), hooks=(),
                 **over) -> Trainer:
    cfg = TrainConfig(**{"epochs": 1, "batch_size": 16, "lr": 0.05, "log_interval": 100,
                         **over})
    torch.manual_seed(0)
    data = SimpleNamespace(train=FakeLoader(random_batches(steps, learnable=True)),
                           test=FakeLoader(random_batches(2, seed=1, learnable=True)))
    run = RunSettings(dist=dist, precision=precision, show_progress=False)
    return Trainer(model or build_model(ARCH), cfg, data, out_dir, run=run, arch=ARCH,
                   base_lr=0.05, meta={"stage": "pretrain"}, hooks=hooks)


def count_host_syncs(monkeypatch) -> list[str]:
    """Record every Python-level tensor -> host read (item, tolist, bool/float/int)."""
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            calls.append(_name)
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    return calls


def test_no_host_sync_per_step(tmp_path, monkeypatch):
    """Host reads happen per epoch / log interval, never per step: 3 or 9 steps per
    epoch make the same number of them."""
    counts = []
    for steps in (3, 9):
        trainer = make_trainer(tmp_path / str(steps), steps=steps, epochs=2)
        with monkeypatch.context() as m:
            calls = count_host_syncs(m)
            trainer.fit()
        counts.append(len(calls))
    assert counts[0] == counts[1] and counts[0] <= 12, counts


def step_losses(out_dir: Path) -> list[float]:
    """train_log.csv's loss column (one row per step with log_interval=1)."""
    import csv

    with open(out_dir / "train_log.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


def test_bf16_on_cpu_trains_and_reloads(tmp_path):
    trainer = make_trainer(tmp_path, steps=4, precision="bf16", epochs=2, log_interval=1)
    with autocast_context(torch.device("cpu"), "bf16"):
        assert trainer.net(trainer.data.test.batches[0][0]).dtype == torch.bfloat16
    result = trainer.fit()
    # against fp32 from the same seed, weights and batches: the first epoch's 4 step losses
    # agree within 1% relative. bf16 keeps 8 significant bits (0.2% rounding per value);
    # step 1 differs only by the forward's rounding (0.05% measured), later steps also by
    # weights updated from bf16 gradients, a drift that grows (0.35% at step 4, 7% by
    # step 8), so 1% is ~3x the drift of the compared steps, far below a wrong loss.
    # Not bitwise equal: training did run under bf16 autocast.
    make_trainer(tmp_path / "fp32", steps=4, precision="fp32", epochs=2, log_interval=1).fit()
    bf16, fp32 = step_losses(tmp_path)[:4], step_losses(tmp_path / "fp32")[:4]
    assert bf16 == pytest.approx(fp32, rel=1e-2) and bf16 != fp32
    rows = (tmp_path / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "nan" not in "".join(rows)
    first, last = (float(r.split(",")[2]) for r in (rows[1], rows[2]))
    assert last < first  # it learns
    ckpt.save_model(tmp_path / "model.pt", trainer.final_model(), ARCH)
    reloaded = load_model(tmp_path / "model.pt")
    assert all(v.dtype != torch.bfloat16 for v in reloaded.state_dict().values())
    again = evaluate(reloaded, trainer.data.test, torch.device("cpu"), "bf16")
    assert again["top1"] == pytest.approx(result["top1"], abs=1e-6)
    assert again["test_loss"] == pytest.approx(result["test_loss"], abs=1e-6)
    # and the bf16 trainer checkpoint resumes (here: already finished, nothing to train)
    assert make_trainer(tmp_path, steps=4, precision="bf16", epochs=2).try_resume()


def test_checkpoint_holds_what_exact_resume_needs(tmp_path):
    trainer = make_trainer(tmp_path, steps=3, ema_decay=0.9)
    trainer.fit()
    state = ckpt.load(tmp_path / "last.pt")  # weights_only=True inside
    assert state["schema"] == ckpt.SCHEMA_VERSION and state["kind"] == "trainer"
    for key in ("state_dict", "arch", "optimizer", "scaler", "ema", "epoch", "global_step",
                "step_in_epoch", "best_top1", "best_epoch", "steps_per_epoch", "epoch_acc"):
        assert key in state, key
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    assert (state["epoch"], state["global_step"], state["step_in_epoch"]) == (1, 3, 0)
    assert state["best_epoch"] == 0 and (tmp_path / "best.pt").is_file()
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in state["state_dict"])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    class NanAt(nn.Module):
        """resnet8 whose 6th training forward (step 5) returns NaN logits."""

        def __init__(self):
            super().__init__()
            self.net, self.calls = build_model(ARCH), 0

        def forward(self, x):
            out = self.net(x)
            if self.training:
                self.calls += 1
                if self.calls == 6:
                    out = out * float("nan")
            return out

    trainer = make_trainer(tmp_path, steps=8, model=NanAt(), log_interval=3,
                           checkpoint_every_steps=2)
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    message = str(err.value)
    assert "\n" not in message
    assert "non-finite loss at step 5 (epoch 1, batch 6)" in message
    assert "step 4" in message and "last.pt" in message
    assert f"the last good checkpoint is {tmp_path / 'last.pt'} (epoch 0.5, step 4)" in message
    last = ckpt.load(tmp_path / "last.pt")
    assert last["global_step"] == 4
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values()
               if v.is_floating_point())
    assert not (tmp_path / "metrics.csv").exists()  # the failed epoch wrote no row


class NanCalls(nn.Module):
    """resnet8 whose training forwards number `bad` (1-based) return NaN logits."""

    def __init__(self, bad):
        super().__init__()
        self.net, self.calls, self.bad = build_model(ARCH), 0, bad

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.bad(self.calls):
                out = out * float("nan")
        return out


def test_skip_step_drops_the_update_and_counts_it(tmp_path):
    seen = []
    hook = CallbackHook(after_step=lambda t: seen.append(
        [p.detach().clone() for p in t.module.parameters()]))
    trainer = make_trainer(tmp_path, steps=6, model=NanCalls(lambda k: k in (3, 5)),
                           on_nonfinite="skip_step", log_interval=2, hooks=[hook])
    result = trainer.fit()
    assert result["skipped_steps"] == 2 and trainer.skipped_in_a_row == 0
    # step 2 (the 3rd forward) changed nothing; step 1 and step 3 did
    assert all(torch.equal(a, b) for a, b in zip(seen[1], seen[2], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(seen[2], seen[3], strict=True))
    assert all(torch.isfinite(p).all() for p in trainer.module.parameters())
    assert ckpt.load(tmp_path / "last.pt")["skipped_steps"] == 2


def test_skip_step_stops_after_max_skipped_steps_in_a_row(tmp_path):
    trainer = make_trainer(tmp_path, steps=8, model=NanCalls(lambda k: k >= 4),
                           on_nonfinite="skip_step", max_skipped_steps=3,
                           checkpoint_every_steps=2)
    with pytest.raises(TrainingError) as err:
        trainer.fit()
    message = str(err.value)
    assert "3 non-finite steps in a row (up to step 5, max_skipped_steps 3)" in message
    # the step-4 checkpoint is good: the skipped steps changed no weight
    assert "last.pt (epoch 0.5, step 4)" in message


def test_all_checkpoints_corrupt_restarts_afresh(tmp_path, caplog):
    make_trainer(tmp_path, steps=3, epochs=2).fit()
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    data = (tmp_path / "last.prev.pt").read_bytes()
    (tmp_path / "last.prev.pt").write_bytes(data[: len(data) // 2])  # truncated
    trainer = make_trainer(tmp_path, steps=3, epochs=2)
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        assert trainer.try_resume() is False
    lines = [r.getMessage() for r in caplog.records]
    assert sum("last.pt: not a torch checkpoint" in m and "falling back" in m for m in lines) == 1
    assert sum("last.prev.pt: truncated" in m for m in lines) == 1
    assert any("starting the stage afresh" in m for m in lines)
    assert (tmp_path / "last.pt.corrupt").is_file() and not (tmp_path / "last.pt").exists()


def test_corrupt_last_falls_back_then_config_change_is_refused(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 2}}})
    stage = tmp_path / "runs" / "tiny" / "pretrain"
    assert cli("run", cfg, "--stage", "pretrain")[0] == 0
    size = (stage / "last.pt").stat().st_size
    with open(stage / "last.pt", "r+b") as f:
        f.truncate(size // 3)  # as if the disk filled up while copying the run
    (stage / "summary.json").unlink()
    code, _, err = cli("run", cfg, "--stage", "pretrain", "--set", "stages.pretrain.epochs=3")
    assert code == 0, err
    assert "Traceback" not in err
    (warning,) = [line for line in err.splitlines() if "last.pt" in line and "truncated" in line]
    assert "falling back" in warning
    assert "resumed from" in err and "last.prev.pt at epoch 1, step 3" in err
    epochs = [r.split(",")[0] for r in (stage / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["0", "1", "2"]

    # a readable checkpoint from another batch size: one line, exit 1, nothing overwritten
    (stage / "summary.json").unlink()
    before = (stage / "last.pt").read_bytes()
    code, _, err = cli("run", cfg, "--stage", "pretrain", "--set", "stages.pretrain.epochs=3",
                       "--set", "stages.pretrain.batch_size=16")
    assert code == 1 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    assert "steps per epoch" in line and "--restart --stage pretrain" in line
    assert (stage / "last.pt").read_bytes() == before


def test_failed_restart_never_overwrites_completed_stage(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 1}}})
    stage = tmp_path / "runs" / "tiny" / "pretrain"
    assert cli("run", cfg, "--stage", "pretrain")[0] == 0
    model = (stage / "model.pt").read_bytes()
    code, _, err = cli("run", cfg, "--stage", "pretrain", "--restart",
                       "--set", "stages.pretrain.lr=1.0e+30", "--set",
                       "stages.pretrain.log_interval=1")
    assert code == 1 and "non-finite loss at step" in err and "Traceback" not in err
    assert json.loads((stage / "summary.json").read_text())["status"] == "completed"
    assert (stage / "model.pt").read_bytes() == model


def test_channels_last_progress_and_missing_tensorboard(tmp_path, capsys, caplog):
    trainer = make_trainer(tmp_path, steps=4, channels_last=True, log_interval=2)
    trainer.show_progress, trainer.tensorboard = True, True
    with caplog.at_level(logging.WARNING, logger="pipeline"):
        trainer.fit()
    assert trainer.module.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    err = capsys.readouterr().err
    assert "img_s=" in err and "lr=" in err  # the tqdm bar's postfix
    try:
        import tensorboard  # noqa: F401
        assert any((tmp_path / "tb").iterdir())
    except ImportError:
        assert any("tensorboard" in r.getMessage() for r in caplog.records)
    ckpt.save_model(tmp_path / "model.pt", trainer.module, ARCH)
    plain = load_model(tmp_path / "model.pt").eval()
    x = trainer.data.test.batches[0][0]
    assert torch.allclose(plain(x), trainer.module.eval()(x), atol=1e-5)
    log_rows = (tmp_path / "train_log.csv").read_text().splitlines()
    assert log_rows[0] == "step,epoch,lr,loss,acc,images,images_per_s"
    assert [r.split(",")[0] for r in log_rows[1:]] == ["2", "4"]


def test_global_batch_too_small_for_the_world(tmp_path):
    with pytest.raises(ConfigError, match="stages.pretrain.batch_size"):
        make_trainer(tmp_path, batch_size=4, dist=DistInfo(rank=0, world_size=4))


def test_compiled_model_trains_and_saves_the_plain_module(tmp_path, monkeypatch):
    """`compile: true` wraps the model in torch.compile (the eager backend here, to skip
    code generation); checkpoints hold the plain module's keys, resumable without it."""
    import functools

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    trainer = make_trainer(tmp_path, steps=2, compile=True)
    assert hasattr(trainer.net, "_orig_mod") and trainer.net._orig_mod is trainer.module
    trainer.fit()
    state = ckpt.load(tmp_path / "last.pt")
    assert set(state["state_dict"]) == set(build_model(ARCH).state_dict())
    plain = make_trainer(tmp_path, steps=2, epochs=2)
    assert plain.try_resume() and plain.global_step == 2


def test_eval_every_skips_test_passes_but_always_evaluates_the_last_epoch(tmp_path, monkeypatch):
    import csv

    from pipeline import report
    from pipeline import trainer as trainer_mod

    calls = []
    real = trainer_mod.evaluate
    monkeypatch.setattr(trainer_mod, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    trainer = make_trainer(tmp_path, steps=2, epochs=5, eval_every=2)
    result = trainer.fit()
    assert len(calls) == 3  # after epochs 2, 4 and the last (5)
    rows = list(csv.DictReader(open(tmp_path / "metrics.csv")))
    assert [r["top1"] != "" for r in rows] == [False, True, False, True, True]
    assert all(r["train_loss"] != "" for r in rows)
    assert result["top1"] == pytest.approx(float(rows[-1]["top1"]))
    assert trainer.best_epoch in (1, 3, 4)
    # the report reads the gaps as missing numbers, not as zeros
    assert ["top1" in r for r in report.read_metrics(tmp_path)] == [False, True, False, True, True]


def test_hooks_see_every_step_epoch_and_checkpoint_in_order(tmp_path):
    """A trainer's hooks: before and after training, before and after each optimizer step,
    after each epoch's steps and after each checkpoint (here every 2 steps and at the 2 epoch ends),
    in that order; best.pt and last.pt share the best epoch's file."""
    events, before, steps, saved = [], [], [], []

    class Recorder(HookBase):
        def before_train(self, t):
            events.append(("before_train", t.global_step))

        def before_step(self, t):
            before.append(t.global_step)

        def after_step(self, t):
            steps.append((t.global_step, t.saved_step))

        def after_epoch(self, t):
            events.append(("after_epoch", t.global_step))

        def after_checkpoint(self, t):
            saved.append(t.saved_step)

        def after_train(self, t):
            events.append(("after_train", t.global_step))

    make_trainer(tmp_path, steps=3, epochs=2, checkpoint_every_steps=2,
                 hooks=[Recorder()]).fit()
    # step k's hook runs before any checkpoint of step k
    assert steps == [(1, None), (2, None), (3, 2), (4, 3), (5, 4), (6, 4)]
    assert saved == [2, 3, 4, 6]
    assert before == [0, 1, 2, 3, 4, 5]
    assert events == [("before_train", 0), ("after_epoch", 3), ("after_epoch", 6),
                      ("after_train", 6)]
    make_trainer(tmp_path / "again", steps=3).fit()
    assert len(steps) == 6  # a hook belongs to its trainer: no other trainer calls it
    last, prev, best = (tmp_path / n for n in ("last.pt", "last.prev.pt", "best.pt"))
    assert ckpt.load(prev)["global_step"] == 4 and ckpt.load(last)["global_step"] == 6
    best_epoch = ckpt.load(last)["best_epoch"]
    assert ckpt.load(best)["epoch"] == best_epoch + 1
    assert os.path.samefile(best, last) == (best_epoch == 1)


def test_the_loaders_meet_the_trainer_loader_interface(tmp_path):
    """The data package's training loaders (in-memory and DataLoader paths) and the test
    fake are `TrainLoader`s; something without `iterate(start)` is not."""
    import numpy as np
    from fakes import FakeLoader
    from PIL import Image

    from pipeline.data import DataConfig, SyntheticConfig, build_data
    from pipeline.trainer import TrainLoader

    synthetic = DataConfig(dataset="synthetic", synthetic=SyntheticConfig(
        num_classes=2, train_size=16, test_size=8, image_size=8))
    for c in ("a", "b"):
        (tmp_path / "train" / c).mkdir(parents=True)
        (tmp_path / "val" / c).mkdir(parents=True)
        for i in range(4):
            img = Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8))
            img.save(tmp_path / "train" / c / f"{i}.png")
            img.save(tmp_path / "val" / c / f"{i}.png")
    folder = DataConfig(dataset="imagefolder", root=str(tmp_path), image_size=8,
                        loader="dataloader", num_workers=0)
    for cfg in (synthetic, folder):
        loader = build_data(cfg, 4, 4, 0, torch.device("cpu")).train
        assert isinstance(loader, TrainLoader), type(loader)
    assert isinstance(FakeLoader([]), TrainLoader)
    assert not isinstance([(torch.zeros(1), torch.zeros(1))], TrainLoader)
