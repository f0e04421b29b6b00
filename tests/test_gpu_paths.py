"""The CUDA/NCCL code paths, checked on the CPU with `torch.cuda` mocked: one GPU per
rank, the collective timeout, set_device, determinism and cuDNN autotuning, per-rank CUDA
RNG states and seeds, no per-step host syncs (pinned copies, fused optimizers, masks kept
on the weight's device), torch.compile options."""

from __future__ import annotations

import logging
import os
from datetime import timedelta
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import torch.nn as nn

from conftest import TINY
from pipeline import distributed as D
from pipeline import rng
from pipeline.config import ConfigError
from pipeline.recipes import OptimizerConfig, build_optimizer, to_device
from pipeline.runconfig import parse
from pipeline.trainer import Trainer

TORCHRUN_2 = D.DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2)


def cuda_with(gpus: int):
    return mock.patch.multiple(torch.cuda, is_available=mock.Mock(return_value=True),
                               device_count=mock.Mock(return_value=gpus))


# ----------------------------------------------------------------- item 1: a GPU per rank

def test_two_ranks_on_one_gpu_is_a_config_error():
    with cuda_with(1), pytest.raises(ConfigError) as err:
        D.resolve_device("auto", TORCHRUN_2, "run.yaml")
    assert "run.yaml: device: auto" in str(err.value)
    assert "2 processes" in str(err.value) and "1 GPU(s)" in str(err.value)
    with cuda_with(1), pytest.raises(ConfigError):
        D.resolve_device("cuda", TORCHRUN_2)


def test_explicit_cuda_index_under_torchrun_is_a_config_error():
    with cuda_with(4), pytest.raises(ConfigError) as err:
        D.resolve_device("cuda:1", TORCHRUN_2, "run.yaml")
    assert "device: cuda:1" in str(err.value) and "torchrun" in str(err.value)


def test_each_local_rank_takes_its_own_gpu():
    with cuda_with(2):
        assert D.resolve_device("auto", TORCHRUN_2) == torch.device("cuda", 1)
        assert D.resolve_device("cuda", TORCHRUN_2) == torch.device("cuda", 1)
        assert D.resolve_device("cuda:1", D.DistInfo()) == torch.device("cuda", 1)
    with mock.patch.object(torch.cuda, "is_available", return_value=False):
        assert D.resolve_device("auto", TORCHRUN_2) == torch.device("cpu")
    assert D.resolve_device("cpu", TORCHRUN_2) == torch.device("cpu")


def test_env_info_reads_local_world_size(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert D.env_info() == D.DistInfo(3, 4, 1, 2)


# ------------------------------------------------- item 2 and 10: timeout and set_device

def test_init_passes_the_timeout_and_sets_the_device():
    with mock.patch.object(D.dist, "is_initialized", return_value=False), \
            mock.patch.object(D.dist, "init_process_group") as init, \
            mock.patch.object(torch.cuda, "set_device") as set_device:
        D.init(TORCHRUN_2, torch.device("cuda", 1), timeout_minutes=60)
    init.assert_called_once_with("nccl", timeout=timedelta(minutes=60))
    set_device.assert_called_once_with(torch.device("cuda", 1))


def test_single_process_cuda_n_sets_its_device():
    with mock.patch.object(torch.cuda, "set_device") as set_device, \
            mock.patch.object(D.dist, "init_process_group") as init:
        D.init(D.DistInfo(), torch.device("cuda", 3))
    set_device.assert_called_once_with(torch.device("cuda", 3))
    init.assert_not_called()


def test_timeout_and_deterministic_config_keys():
    cfg = parse(dict(TINY), "t.yaml")
    assert cfg.distributed.timeout_minutes == 60 and cfg.deterministic is False
    cfg = parse({**TINY, "distributed": {"timeout_minutes": 5}, "deterministic": True}, "t.yaml")
    assert cfg.distributed.timeout_minutes == 5 and cfg.deterministic is True
    with pytest.raises(ConfigError, match="distributed.timeout_minutes"):
        parse({**TINY, "distributed": {"timeout_minutes": 0}}, "t.yaml")


# -------------------------------------------------------- items 6 and 7: kernel settings

@pytest.fixture
def kernel_settings():
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(),
             os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    yield
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[:2]
    torch.use_deterministic_algorithms(saved[2])
    if saved[3] is None:
        os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    else:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = saved[3]


def test_cudnn_benchmark_on_cuda(kernel_settings):
    torch.backends.cudnn.benchmark = False
    rng.configure_kernels(torch.device("cpu"), deterministic=False)
    assert torch.backends.cudnn.benchmark is False
    rng.configure_kernels(torch.device("cuda", 0), deterministic=False)
    assert torch.backends.cudnn.benchmark is True


def test_deterministic_switch(kernel_settings, monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    rng.configure_kernels(torch.device("cuda", 0), deterministic=True)
    assert torch.backends.cudnn.benchmark is False
    assert torch.backends.cudnn.deterministic is True
    assert torch.are_deterministic_algorithms_enabled()
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


# ------------------------------------------------ item 8 and 10: per-rank CUDA RNG states

def test_rng_state_leaves_cuda_alone_on_the_cpu():
    with mock.patch.object(torch.cuda, "is_available", return_value=True), \
            mock.patch.object(torch.cuda, "get_rng_state_all") as get_all, \
            mock.patch.object(torch.cuda, "get_rng_state") as get:
        state = rng.rng_state(torch.device("cpu"))
    get_all.assert_not_called()
    get.assert_not_called()
    assert not any(k.startswith("cuda") for k in state)


def test_each_rank_saves_and_restores_its_own_cuda_state():
    mine = torch.arange(8, dtype=torch.uint8)
    other = torch.arange(8, 16, dtype=torch.uint8)
    with mock.patch.object(torch.cuda, "get_rng_state", return_value=mine) as get, \
            mock.patch.object(D, "all_gather_object", side_effect=lambda o: [other, o]):
        state = rng.rng_state(torch.device("cuda", 1))
    get.assert_called_once_with(torch.device("cuda", 1))
    assert [t.tolist() for t in state["cuda_ranks"]] == [other.tolist(), mine.tolist()]
    with mock.patch.object(torch.cuda, "set_rng_state") as put:
        rng.set_rng_state(state, torch.device("cuda", 1), rank=1, world_size=2)
    put.assert_called_once()
    assert put.call_args.args[0].tolist() == mine.tolist()
    assert put.call_args.args[1] == torch.device("cuda", 1)
    with mock.patch.object(torch.cuda, "set_rng_state") as put:  # another world size
        rng.set_rng_state(state, torch.device("cuda", 0), rank=0, world_size=4)
    put.assert_not_called()


def test_cuda_seed_is_offset_by_rank():
    with mock.patch.object(torch.cuda, "manual_seed") as seed:
        rng.seed_everything(7, torch.device("cuda", 1), rank=3)
    seed.assert_called_once_with(10)


# ------------------------------------------------------------ item 5: no per-step syncs

def test_cuda_copies_go_through_pinned_memory():
    t = mock.Mock()
    pinned = t.pin_memory.return_value
    to_device(t, torch.device("cuda", 0))
    t.pin_memory.assert_called_once_with()
    pinned.to.assert_called_once_with(torch.device("cuda", 0), non_blocking=True)
    t = mock.Mock()
    to_device(t, torch.device("cpu"))
    t.pin_memory.assert_not_called()


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_on_cuda(name):
    model = nn.Linear(4, 2)
    fused = build_optimizer(model, OptimizerConfig(name=name), 0.1, fused=True)
    assert fused.defaults["fused"] is True
    plain = build_optimizer(model, OptimizerConfig(name=name), 0.1)
    assert not plain.defaults.get("fused")


def test_trainer_asks_for_fused_optimizer_on_cuda():
    with mock.patch("pipeline.trainer.build_optimizer", side_effect=RuntimeError("stop")) as b:
        fake = SimpleNamespace(device=torch.device("cuda", 0))
        with pytest.raises(RuntimeError):
            Trainer._build_optimizer(fake, nn.Linear(2, 2), OptimizerConfig(), 0.1)
    assert b.call_args.kwargs["fused"] is True


def test_soft_pruning_masks_move_once_to_the_weight_device():
    from pipeline.pruning.soft import SoftPruner

    pruner = SoftPruner.__new__(SoftPruner)
    pruner.masks = {"conv": torch.ones(4)}
    hook = pruner._grad_hook("conv")
    grad = torch.ones(4, 3, 3, 3, device="meta")
    hook(grad)
    assert pruner.masks["conv"].device.type == "meta"  # kept where the gradients are
    moved = pruner.masks["conv"]
    hook(grad)
    assert pruner.masks["conv"] is moved  # no copy in the next backward


# ------------------------------------------------------- item 10: torch.compile options

def _fake_trainer():
    return SimpleNamespace(dist=D.DistInfo(), cfg=SimpleNamespace(compile=True),
                           stage="pretrain")


def test_compile_is_static_shape():
    with mock.patch.object(torch, "compile", side_effect=lambda m, **kw: ("compiled", kw)):
        net = Trainer._wrapped(_fake_trainer(), nn.Sequential(nn.BatchNorm2d(3)))
    assert net == ("compiled", {"dynamic": False})


def test_compile_with_sync_bn_warns_and_runs_uncompiled(caplog):
    module = nn.Sequential(nn.SyncBatchNorm(3))
    with mock.patch.object(torch, "compile") as compile_, \
            caplog.at_level(logging.WARNING, logger="pipeline"):
        net = Trainer._wrapped(_fake_trainer(), module)
    compile_.assert_not_called()
    assert net is module
    assert "107372" in caplog.text and "uncompiled" in caplog.text


# --------------------------------------------- item 10: a resume across world sizes

def test_resume_names_a_changed_world_size():
    fake = SimpleNamespace(steps_per_epoch=4, dist=TORCHRUN_2)
    why = Trainer._incompatibility(fake, {"steps_per_epoch": 3, "world_size": 3})
    assert "written by 3 processes, this run has 2" in why
    why = Trainer._incompatibility(fake, {"steps_per_epoch": 3, "world_size": 2})
    assert "data or batch size changed" in why
