"""The CUDA/NCCL code paths, checked on the CPU with `torch.cuda` mocked at the device
level (availability, count, properties): one GPU per rank, the collective timeout,
set_device, determinism and cuDNN autotuning (in `run` and `eval`), bf16 only where the GPU
computes it natively, per-rank CUDA RNG states and seeds, no per-step host syncs (pinned
copies, fused optimizers, masks kept on the weight's device), torch.compile options,
tensor-core widths, layers without a deterministic CUDA backward."""

from __future__ import annotations

import json
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
from pipeline.models import build_model
from pipeline.recipes import OptimizerConfig, build_optimizer, to_device
from pipeline.runconfig import parse
from pipeline.trainer import Trainer, compiled, optimizer_for

ARCH = {"name": "resnet8", "num_classes": 4, "shortcut": "A"}

TORCHRUN_2 = D.DistInfo(rank=1, world_size=2, local_rank=1, local_world_size=2)


def cuda_with(gpus: int):
    return mock.patch.multiple(torch.cuda, is_available=mock.Mock(return_value=True),
                               device_count=mock.Mock(return_value=gpus))


# ---------------------------------------------------------------------- a GPU per rank

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


def test_gloo_lets_ranks_share_a_gpu():
    """`distributed.backend: gloo`: 2 local ranks on 1 GPU (a check of the CUDA model under
    several processes on a 1-GPU machine); the process group is gloo on the CUDA device."""
    with cuda_with(1):
        assert D.resolve_device("auto", TORCHRUN_2, backend="gloo") == torch.device("cuda", 0)
        assert D.resolve_device("cuda", D.DistInfo(0, 2, 0, 2), backend="gloo") == \
            torch.device("cuda", 0)
    with mock.patch.object(D.dist, "is_initialized", return_value=False), \
            mock.patch.object(D.dist, "init_process_group") as init, \
            mock.patch.object(torch.cuda, "set_device"):
        D.init(TORCHRUN_2, torch.device("cuda", 0), timeout_minutes=5, backend="gloo")
    init.assert_called_once_with("gloo", timeout=timedelta(minutes=5))
    cfg = parse({**TINY, "distributed": {"backend": "gloo"}}, "t.yaml")
    assert cfg.distributed.backend == "gloo"
    with pytest.raises(ConfigError, match="distributed.backend"):
        parse({**TINY, "distributed": {"backend": "mpi"}}, "t.yaml")


def test_env_info_reads_local_world_size(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert D.env_info() == D.DistInfo(3, 4, 1, 2)


# ---------------------------------------------------------- timeout and set_device

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


# ------------------------------------------------------------------- kernel settings

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


# ----------------------------------------------------------- per-rank CUDA RNG states

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


# ------------------------------------------------------------------- no per-step syncs

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


def test_training_optimizer_is_fused_on_cuda_only():
    model = nn.Linear(4, 2)
    assert optimizer_for(model, OptimizerConfig(), 0.1, torch.device("cuda", 0)).defaults[
        "fused"] is True
    assert not optimizer_for(model, OptimizerConfig(), 0.1, torch.device("cpu")).defaults.get(
        "fused")


def test_soft_pruning_masks_stay_with_the_gradients(tmp_path):
    """With mask_gradients the zeroed filters get no gradient, and each mask is kept on
    its weight's device and dtype after the first backward (no copy per step)."""
    from pipeline.pruning.soft import SoftPruner, SoftPruneSpec

    torch.manual_seed(0)
    model = build_model({"name": "resnet8", "num_classes": 4, "shortcut": "A"})
    spec = SoftPruneSpec(method="l1", ratio=0.5)
    spec.validate()
    pruner = SoftPruner(model, spec, torch.zeros(1, 3, 16, 16), mask_gradients=True)
    record = pruner.step()
    model(torch.randn(2, 3, 16, 16)).sum().backward()
    name = record[0]["convs"][0]
    conv = model.get_submodule(name)
    assert conv.weight.grad[record[0]["removed"]].abs().sum() == 0
    masks = [m for m in pruner.masks.values() if m.dim()]
    assert masks and all(m.device == conv.weight.device and m.dtype == conv.weight.dtype
                         for m in masks)


# ---------------------------------------------------------------- torch.compile options

def test_compile_is_static_shape():
    with mock.patch.object(torch, "compile", side_effect=lambda m, **kw: ("compiled", kw)):
        net = compiled(nn.Sequential(nn.BatchNorm2d(3)), nn.Sequential(), "pretrain")
    assert net == ("compiled", {"dynamic": False})


def test_compile_with_sync_bn_warns_and_runs_uncompiled(caplog):
    module = nn.Sequential(nn.SyncBatchNorm(3))
    with mock.patch.object(torch, "compile") as compile_, \
            caplog.at_level(logging.WARNING, logger="pipeline"):
        net = compiled(module, module, "pretrain")
    compile_.assert_not_called()
    assert net is module
    assert "107372" in caplog.text and "uncompiled" in caplog.text


# ---------------------------------------------------------- a resume across world sizes

def test_resume_names_a_changed_world_size(tmp_path):
    """A checkpoint written by another number of processes, with other steps per epoch: the
    resume refuses it and says why."""
    from fakes import FakeLoader, random_batches

    from pipeline import checkpoint as ckpt
    from pipeline.trainer import RunSettings, TrainConfig

    def trainer(steps: int) -> Trainer:
        torch.manual_seed(0)
        data = SimpleNamespace(train=FakeLoader(random_batches(steps)),
                               test=FakeLoader(random_batches(1)))
        return Trainer(build_model(ARCH), TrainConfig(epochs=1, batch_size=16, lr=0.05),
                       data, tmp_path, run=RunSettings(show_progress=False), arch=ARCH,
                       base_lr=0.05, meta={"stage": "pretrain"})

    trainer(3).fit()
    last = ckpt.load(tmp_path / "last.pt")
    ckpt.atomic_save({**last, "world_size": 3}, tmp_path / "last.pt")
    with pytest.raises(ckpt.CheckpointError, match="written by 3 processes, this run has 1"):
        trainer(4).try_resume()
    ckpt.atomic_save({**last, "world_size": 1}, tmp_path / "last.pt")
    with pytest.raises(ckpt.CheckpointError, match="data or batch size changed"):
        trainer(4).try_resume()


# ------------------------------------------------------- bf16: native on the GPU only

def gpu(major: int, minor: int = 0):
    """A CUDA device of compute capability major.minor (its properties mocked), on which
    `torch.cuda.is_bf16_supported()` says True whatever the capability (emulation)."""
    props = SimpleNamespace(major=major, minor=minor, name=f"sm_{major}{minor}")
    return mock.patch.multiple(torch.cuda, is_available=mock.Mock(return_value=True),
                               device_count=mock.Mock(return_value=1),
                               current_device=mock.Mock(return_value=0),
                               get_device_properties=mock.Mock(return_value=props),
                               is_bf16_supported=mock.Mock(return_value=True))


@pytest.mark.parametrize("major, minor, want", [(7, 0, "fp16"), (7, 5, "fp16"),
                                                (8, 0, "bf16"), (9, 0, "bf16")],
                         ids=["V100", "T4", "A100", "H100"])
def test_auto_takes_bf16_only_where_the_gpu_computes_it_natively(major, minor, want):
    from pipeline.precision import decide, eval_precision

    cuda = torch.device("cuda", 0)
    with gpu(major, minor), mock.patch.object(torch.version, "hip", None):
        assert eval_precision("auto", cuda) == want  # `eval` and evaluation-only stages
        assert decide(nn.Linear(2, 2), None, cuda, False).precision == want  # training


# -------------------------------------------------------- eval turns cuDNN autotuning on

def test_eval_sets_the_kernels_before_evaluating(tmp_path, kernel_settings):
    """`pipeline eval` on a GPU: cuDNN autotuning on (or the deterministic kernels with the
    run's `deterministic: true`) by the time the data is built and evaluated."""
    import yaml

    from pipeline import checkpoint as ckpt
    from pipeline import evaluate as E

    stage = tmp_path / "run" / "pretrain"
    stage.mkdir(parents=True)
    ckpt.save_model(stage / "model.pt", build_model(ARCH), ARCH, {"stage": "pretrain"})
    seen = []

    class Reached(Exception):
        pass

    def at_build(*a, **k):
        seen.append((torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic))
        raise Reached

    for deterministic in (False, True):
        cfg = {**TINY, "deterministic": deterministic}
        (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(cfg))
        torch.backends.cudnn.benchmark = torch.backends.cudnn.deterministic = False
        with gpu(8), mock.patch.object(torch.cuda, "set_device"), \
                mock.patch.object(E, "build_data", at_build), pytest.raises(Reached):
            E.evaluate_stage(stage, E.EvalOptions(device="cuda"))
    assert seen == [(True, False), (False, True)]


# ------------------------------------------------- tensor-core widths in half precision

def _plan(cli, config) -> dict:
    code, out, err = cli("run", config, "--dry-run", "--format", "json")
    assert code == 0, err
    return {s["name"]: s for s in json.loads(out)["stages"]}


def test_round_to_defaults_to_8_on_cuda_in_half_precision(cli, tiny_config):
    """On CUDA with bf16 the prune stage keeps multiples of 8 (resnet8 at ratio 0.4:
    16/32/64 keep 8/16/32 instead of 10/20/39) and the plan names the widths it changed;
    round_to set (0: none) wins; fp32 or the CPU keep the plain rule."""
    half = {"precision": "bf16"}
    with gpu(9):
        prune = _plan(cli, tiny_config(half))["prune"]
        note = prune["tensor_core_rounding"]
        assert note["round_to"] == 8
        assert sorted(note["changed"].values()) == [[10, 8], [20, 16], [39, 32]]
        assert set(note["changed"]) == set(prune["predicted"]["widths"])
        assert sorted(prune["predicted"]["widths"].values()) == [8, 16, 32]
        code, out, _ = cli("run", tiny_config(half), "--dry-run")
        assert "rounded down to a multiple of 8 (default on CUDA with fp16/bf16)" in out
        for over in ({"stages": {"prune": {"round_to": 0}}}, {"precision": "fp32"}):
            prune = _plan(cli, tiny_config({**half, **over}))["prune"]
            assert "tensor_core_rounding" not in prune
            assert sorted(prune["predicted"]["widths"].values()) == [10, 20, 39]
        prune = _plan(cli, tiny_config({**half, "stages": {"prune": {"round_to": 4}}}))[
            "prune"]
        assert "tensor_core_rounding" not in prune
        assert sorted(prune["predicted"]["widths"].values()) == [8, 16, 36]
    prune = _plan(cli, tiny_config(half))["prune"]  # no GPU
    assert "tensor_core_rounding" not in prune


# ------------------------------------- deterministic kernels and adaptive pooling on CUDA

def test_deterministic_with_alexnet_on_cuda_is_caught_before_training(cli, tiny_config):
    over = {"deterministic": True, "model": {"arch": "alexnet"},
            "data": {"synthetic": {"image_size": 64}},
            "stages": {"pretrain": {"epochs": 1}}}
    config = tiny_config({**over, "stages": {"pretrain": {"epochs": 1}}})
    with gpu(8):
        code, _, err = cli("run", config, "--stage", "pretrain")
        assert code == 2
        assert "deterministic: alexnet's avgpool (AdaptiveAvgPool2d(6, 6)) has no " \
               "deterministic CUDA backward" in err
        code, out, _ = cli("run", config, "--dry-run")  # the device is not known yet: a note
        assert code == 0 and "has no deterministic CUDA backward" in out
    # a ResNet's 1x1 pooling is a mean: deterministic
    from pipeline.preflight import nondeterministic_on_cuda
    assert nondeterministic_on_cuda(build_model(ARCH)) == []
    assert nondeterministic_on_cuda(build_model({"name": "vgg11", "num_classes": 4})) == []
    import torchvision
    assert nondeterministic_on_cuda(torchvision.models.vgg11()) == [
        "avgpool (AdaptiveAvgPool2d(7, 7))"]


# ------------------------------------------------ torch.compile in the iterative stage

def test_iterative_rounds_recompile_from_empty_caches(cli, tiny_config):
    """Each round trains new widths: from round 2 on, dynamo's caches are reset before the
    round compiles, and the log says so."""
    config = tiny_config({"stages": {
        "pretrain": {"epochs": 1},
        "prune": None, "finetune": None,
        "iter": {"type": "iterative", "from": "pretrain", "rounds": 3, "finetune_epochs": 1,
                 "lr": 0.01, "compile": True}}})
    import yaml
    cfg = yaml.safe_load(config.read_text())
    cfg["stages"] = {k: v for k, v in cfg["stages"].items() if v is not None}
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    compiles = []
    compile_ = mock.Mock(side_effect=lambda m, **kw: compiles.append(m) or m)
    with mock.patch.object(torch, "compile", compile_), \
            mock.patch.object(torch._dynamo, "reset") as reset:
        code, _, err = cli("run", config, "--progress", "off")
    assert code == 0, err
    assert len(compiles) == 3 and reset.call_count == 2  # one per round, reset before 2, 3
    assert "iterative round 2: new widths, torch.compile caches reset" in err
    assert "iterative round 3: new widths, torch.compile caches reset" in err
