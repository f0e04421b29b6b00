"""`python -m pipeline export`: every format of every architecture family, dense and
FPGM-pruned, written, verified against the PyTorch model and carrying its provenance; a
mismatch writes nothing (exit 1); bad input is one line (exit 2); timing of the files."""

from __future__ import annotations

import json
import re
import sys

import pytest
import torch
import torch.nn as nn
import yaml

import pipeline
from pipeline import checkpoint
from pipeline.data.config import SYNTHETIC_MEAN, SYNTHETIC_STD
from pipeline.export import (
    FORMATS,
    ExportOptions,
    ExportUsageError,
    MissingExtraError,
    export_stage,
    load_exported,
    read_metadata,
    sidecar_path,
    time_exported,
)
from pipeline.export.formats import quiet
from pipeline.models import build_model
from pipeline.provenance import file_sha256
from pipeline.pruning import PruneSpec, prune_model
from pipeline.rundir import write_json

pytestmark = pytest.mark.usefixtures("one_thread")

CIFAR_CASES = {  # name -> (arch, input size)
    "resnet20-A": ({"name": "resnet20", "num_classes": 10, "shortcut": "A"}, 16),
    "resnet56-B": ({"name": "resnet56", "num_classes": 10, "shortcut": "B"}, 16),
    "vgg16": ({"name": "vgg16", "num_classes": 10}, 32),
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def trained_like(model: nn.Module, size: int) -> nn.Module:
    """BN running statistics from data and logits of a trained net's scale (about 10), so
    the fp32 tolerance is tested where trained models live, not on exploding random ones."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn((16, 3, size, size), generator=g)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(x)
        model.eval()
        fc = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
        fc.weight.mul_(10 / model(x).abs().max())
    return model


def make_stage(root, arch: dict, size: int, pruned: bool, data: dict | None = None):
    """A run directory with one completed stage (prune, or pretrain when dense) written the
    way the pipeline writes it: config.yaml, provenance.json, model.pt, summary.json."""
    run_dir = root / f"{arch['name']}-{'pruned' if pruned else 'dense'}"
    stage = "prune" if pruned else "pretrain"
    data = data or {"dataset": "synthetic", "synthetic": {
        "num_classes": arch["num_classes"], "train_size": 20, "test_size": 16,
        "image_size": size}}
    config = {"name": run_dir.name, "seed": 0, "data": data,
              "model": {"arch": arch["name"], "shortcut": arch.get("shortcut", "A")},
              "stages": {"pretrain": {"type": "pretrain"},
                         "prune": {"type": "prune", "from": "pretrain"}}}
    (run_dir / stage).mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    write_json(run_dir / "provenance.json", {"config_hash": "runhash", "git_commit": COMMIT})
    model = build_model(arch)
    if pruned:
        prune_model(model, PruneSpec(method="fpgm", ratio=0.4), torch.zeros(1, 3, size, size))
    checkpoint.save_model(run_dir / stage / "model.pt", trained_like(model, size), arch)
    write_json(run_dir / stage / "summary.json", {
        "stage": stage, "type": stage, "status": "completed", "config_hash": "stagehash",
        "code": {"git_commit": COMMIT, "git_dirty": False}})
    return run_dir / stage


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """(case, pruned) -> stage directory, built once for the module."""
    root = tmp_path_factory.mktemp("runs")
    built = {}

    def get(case: str, pruned: bool):
        if (case, pruned) not in built:
            arch, size = CIFAR_CASES[case]
            built[case, pruned] = make_stage(root / case, arch, size, pruned)
        return built[case, pruned]

    return get


def error_lines(err: str) -> list[str]:
    """The error lines of stderr (log lines of other loggers may be there too)."""
    assert "Traceback" not in err
    return [line for line in err.splitlines() if line.startswith("error:")]


def independent_check(stage_dir, path, fmt: str, batch: int = 1, atol: float = 1e-4):
    """The exported file, loaded on its own, against pipeline.load_model on a new input."""
    model = pipeline.load_model(stage_dir / "model.pt").eval()
    size = read_metadata(path, fmt)["input_size"]
    x = torch.randn((batch, *size), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x)
    out = load_exported(path, fmt)(x).float()
    assert out.shape == ref.shape
    assert (out - ref).abs().max() <= atol
    assert torch.equal(out.argmax(1), ref.argmax(1))


def bn_left(path, fmt: str) -> int:
    """BatchNorm operations left in an exported graph."""
    if fmt == "onnx":
        import onnx

        return sum(n.op_type == "BatchNormalization" for n in onnx.load(str(path)).graph.node)
    with quiet():
        graph = torch.jit.load(str(path)).graph
    return sum("batch_norm" in n.kind() for n in graph.nodes())


def check_export(stage_dir, fmt: str, **options):
    result = export_stage(stage_dir, ExportOptions(format=fmt, **options))
    assert result.path.is_file()
    assert [c.passed for c in result.checks] == [True, True]  # random batch, test images
    assert result.checks[1].images == 16 and result.checks[1].agreement == 1.0
    assert not result.notes
    assert (result.sidecar is not None) == FORMATS[fmt].sidecar
    if result.sidecar:
        assert result.sidecar == sidecar_path(result.path) and result.sidecar.is_file()
    return result


@pytest.fixture(scope="module")
def exports(stages):
    """(case, pruned, format, batch) -> ExportResult, each exported (and checked) once."""
    done = {}

    def get(case: str, pruned: bool, fmt: str, batch: int | None = 1):
        key = (case, pruned, fmt, batch)
        if key not in done:
            stage_dir = stages(case, pruned)
            out = stage_dir / f"batch-{batch or 'dynamic'}{FORMATS[fmt].suffix}"
            done[key] = check_export(stage_dir, fmt, batch=batch, out=out)
        return done[key]

    return get


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("pruned", [False, True], ids=["dense", "pruned"])
@pytest.mark.parametrize("case", list(CIFAR_CASES))
def test_cifar_models_export_verify_and_match(stages, exports, case, pruned, fmt):
    stage_dir = stages(case, pruned)
    result = exports(case, pruned, fmt)
    assert result.path.parent == stage_dir
    independent_check(stage_dir, result.path, fmt)
    meta = read_metadata(result.path, fmt)
    assert meta == result.metadata  # round trip through the file / sidecar
    arch, size = CIFAR_CASES[case]
    assert meta["model"] == arch["name"] and meta["arch"]["name"] == arch["name"]
    assert meta["stage"] == stage_dir.name and meta["run"] == stage_dir.parent.name
    assert (meta["config_hash"], meta["run_config_hash"]) == ("stagehash", "runhash")
    assert meta["git_commit"] == COMMIT and meta["git_dirty"] is False
    assert meta["input_size"] == [3, size, size] and meta["num_classes"] == 10
    assert meta["mean"] == pytest.approx(SYNTHETIC_MEAN)
    assert meta["std"] == pytest.approx(SYNTHETIC_STD)
    assert (meta["format"], meta["precision"], meta["batch"]) == (fmt, "fp32", 1)
    assert meta["model_sha256"] == file_sha256(stage_dir / "model.pt")
    assert ("opset" in meta) == (fmt == "onnx")
    if fmt in ("onnx", "torchscript"):  # what docs/export.md says each folds
        assert bn_left(result.path, fmt) == 0


@pytest.mark.slow
def test_torchvision_resnet50_dense_and_pruned(tmp_path):
    arch = {"name": "resnet50", "num_classes": 10}
    for pruned in (False, True):
        stage_dir = make_stage(tmp_path, arch, 32, pruned)
        for fmt in FORMATS:
            result = check_export(stage_dir, fmt)
            independent_check(stage_dir, result.path, fmt)
            assert read_metadata(result.path, fmt)["model"] == "resnet50"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_dynamic_batch_takes_any_batch(stages, exports, fmt):
    stage_dir = stages("resnet20-A", True)
    result = exports("resnet20-A", True, fmt, batch=None)
    assert result.metadata["batch"] == "dynamic"
    for batch in (1, 5):
        independent_check(stage_dir, result.path, fmt, batch=batch)


def test_fixed_batch_is_fixed(stages):
    stage_dir = stages("resnet20-A", True)
    result = check_export(stage_dir, "onnx", batch=4, out=stage_dir / "b4.onnx")
    assert result.checks[0].images == 4
    independent_check(stage_dir, result.path, "onnx", batch=4)
    with pytest.raises(Exception, match="(?i)dimension|shape|index"):
        load_exported(result.path, "onnx")(torch.randn(3, 3, 16, 16))


@pytest.mark.parametrize("fmt,precision", [("onnx", "fp16"), ("torchscript", "fp16"),
                                           ("torchscript", "bf16"), ("exported", "fp16"),
                                           ("exported", "bf16")])
def test_reduced_precision(stages, fmt, precision):
    stage_dir = stages("resnet20-A", True)
    result = check_export(stage_dir, fmt, precision=precision)
    assert result.path.name == f"model.{precision}{FORMATS[fmt].suffix}"
    meta = read_metadata(result.path, fmt)
    assert meta["precision"] == precision
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}[precision]
    assert meta["input_dtype"] == str(dtype).removeprefix("torch.")
    # the stated tolerance is relative to the logits; against the fp32 model as well
    model = pipeline.load_model(stage_dir / "model.pt").eval()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        ref = model(x)
    out = load_exported(result.path, fmt)(x.to(dtype)).float()
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("fmt", ["torchscript", "exported"])
def test_channels_last(stages, fmt):
    stage_dir = stages("resnet20-A", True)
    result = check_export(stage_dir, fmt, channels_last=True, out=stage_dir / f"cl.{fmt}")
    assert result.metadata["memory_format"] == "channels_last"
    independent_check(stage_dir, result.path, fmt)


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_mismatch_fails_with_exit_1_and_writes_nothing(stages, fmt, cli, monkeypatch):
    stage_dir = stages("resnet20-A", False)
    before = sorted(p.name for p in stage_dir.iterdir())
    real = type(FORMATS[fmt]).runner

    def drifting(self, data, threads=None):
        run = real(self, data, threads)
        return lambda x: run(x) + 1e-3  # what a subtly wrong graph would give

    monkeypatch.setattr(type(FORMATS[fmt]), "runner", drifting)
    code, out, err = cli("export", stage_dir, "--format", fmt, "--out", stage_dir / "bad")
    assert code == 1
    (line,) = error_lines(err)
    assert line.startswith("error: verification failed, nothing written: a random batch")
    assert re.search(r"max \|logit diff\| [0-9.e-]+ \(tolerance 0\.0001\)", line)
    assert sorted(p.name for p in stage_dir.iterdir()) == before  # no file, sidecar, temp


def test_cli_export_of_a_real_run(tiny_config, cli, tmp_path):
    cfg = tiny_config({"stages": {"pretrain": {"epochs": 1}}})
    for stage in ("pretrain", "prune"):
        assert cli("run", cfg, "--stage", stage)[0] == 0
    stage_dir = tmp_path / "runs" / "tiny" / "prune"
    code, out, err = cli("export", stage_dir, "--format", "onnx", "--dynamic-batch")
    assert code == 0, err
    assert out.splitlines()[0].startswith("exported tiny/prune (resnet8, 4 classes, input "
                                          "3x16x16) as onnx fp32, batch dynamic, opset 17")
    assert "verified on a random batch of 3: max |logit diff|" in out
    assert "verified on 64 test images of synthetic: max |logit diff|" in out
    assert f"wrote {stage_dir / 'model.onnx'}" in out
    summary = json.loads((stage_dir / "summary.json").read_text())
    meta = read_metadata(stage_dir / "model.onnx", "onnx")
    assert meta["config_hash"] == summary["config_hash"]
    assert meta["git_commit"] == summary["code"]["git_commit"]
    assert meta["model_sha256"] == summary["model_sha256"]
    assert meta["run_config_hash"] == json.loads(
        (stage_dir.parent / "provenance.json").read_text())["config_hash"]


def error_line(cli, *args) -> str:
    code, out, err = cli("export", *args)
    assert code == 2
    (line,) = error_lines(err)
    return line


def test_usage_errors_are_one_line_exit_2(stages, cli, tmp_path):
    stage_dir = stages("resnet20-A", False)
    before = sorted(p.name for p in stage_dir.iterdir())
    run_dir = stage_dir.parent
    assert "no such stage directory (did you mean 'pretrain'?)" in error_line(
        cli, run_dir / "pretrian", "--format", "onnx")
    assert "--batch and --dynamic-batch" in error_line(
        cli, stage_dir, "--format", "onnx", "--batch", "2", "--dynamic-batch")
    assert "--batch: expected a positive integer" in error_line(
        cli, stage_dir, "--format", "onnx", "--batch", "0")
    assert "--opset applies to --format onnx" in error_line(
        cli, stage_dir, "--format", "torchscript", "--opset", "17")
    assert "--channels-last" in error_line(cli, stage_dir, "--format", "onnx",
                                           "--channels-last")
    assert "--precision bf16" in error_line(cli, stage_dir, "--format", "onnx",
                                            "--precision", "bf16")
    assert "is a directory" in error_line(cli, stage_dir, "--format", "onnx", "--out", run_dir)
    assert sorted(p.name for p in stage_dir.iterdir()) == before


def test_missing_or_corrupt_model_exit_2(stages, cli):
    run_dir = stages("resnet20-A", False).parent
    empty = run_dir / "prune"
    empty.mkdir(exist_ok=True)
    assert "no model.pt (the stage has not completed)" in error_line(
        cli, empty, "--format", "exported")
    (empty / "model.pt").write_bytes(b"not a checkpoint")
    assert "model.pt: not a torch checkpoint" in error_line(cli, empty, "--format", "exported")
    for p in empty.iterdir():
        p.unlink()
    empty.rmdir()


def test_missing_config_exit_2(tmp_path, cli):
    stage_dir = make_stage(tmp_path, CIFAR_CASES["resnet20-A"][0], 16, False)
    (stage_dir.parent / "config.yaml").unlink()
    assert "config.yaml: missing or unreadable" in error_line(
        cli, stage_dir, "--format", "torchscript")


def test_missing_extra_names_the_install_command(stages, cli, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if absent
    line = error_line(cli, stages("resnet20-A", False), "--format", "onnx")
    assert "onnxruntime is not installed" in line
    assert line.endswith("pip install 'prune-pipeline[export]'")
    with pytest.raises(MissingExtraError):
        time_exported("model.onnx", "onnx", batch=1)


def cifar_like_folder(root, classes: int = 10, per_class: int = 2) -> None:
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for split in ("train", "test"):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(folder / f"{i}.png")


def test_without_the_data_random_inputs_only_then_data_root(tmp_path, cli):
    data = {"dataset": "cifar10", "root": str(tmp_path / "moved")}
    arch = {"name": "resnet20", "num_classes": 10, "shortcut": "A"}
    stage_dir = make_stage(tmp_path, arch, 32, True, data=data)
    result = export_stage(stage_dir, ExportOptions(format="torchscript"))
    assert len(result.checks) == 1 and result.checks[0].passed
    (note,) = result.notes
    assert note.startswith(f"test data not available ({tmp_path / 'moved'}: no cifar10 found")
    assert note.endswith("; verified on random inputs only")
    code, _, err = cli("export", stage_dir, "--format", "torchscript")  # written above
    assert code == 2 and "exists; give --force to replace it" in err
    code, out, _ = cli("export", stage_dir, "--format", "torchscript", "--force")
    assert code == 0 and "verified on random inputs only" in out

    cifar_like_folder(tmp_path / "here")
    result = export_stage(stage_dir, ExportOptions(format="torchscript", force=True,
                                                   data_root=str(tmp_path / "here")))
    assert not result.notes and result.checks[1].what == "20 test images of cifar10"


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_time_exported(exports, fmt):
    threads = torch.get_num_threads()
    for batch, file_batch in ((1, 1), (4, None)):
        path = exports("resnet20-A", True, fmt, file_batch).path
        ms = time_exported(path, fmt, batch=batch, threads=2, min_seconds=0.0, min_runs=3,
                           warmup=1)
        assert 0 < ms < 10_000
        assert torch.get_num_threads() == threads
    with pytest.raises(ExportUsageError, match="exported for batch 1, not 4"):
        time_exported(exports("resnet20-A", True, fmt).path, fmt, batch=4, threads=1)

