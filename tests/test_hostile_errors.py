"""Hostile inputs that must end in ONE error line naming the key or the file, with the right
exit code (2 usage/config, 1 run time) and nothing changed outside the run directory:
cyclic `base:` chains, devices that are not here, NaN and inf, non-UTF-8 files, a malformed
suggested.yaml, wrong-typed values, hand-made and malicious checkpoints, val_split sizes,
duplicate YAML keys, percentages above 100, snapshots after training, `--dry-run --stage`,
ONNX opsets, full disks and denied writes in export, an empty config, out_dir under /proc.

Each case writes its inputs, snapshots the folder (`outside_untouched`), runs the CLI
in-process and checks the one line. No case trains: the completed stage that eval and
export read is a freshly initialized model written as a stage's model.pt.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
import yaml

from conftest import TINY, deep_update
from pipeline import atomic
from pipeline import checkpoint as ckpt
from pipeline.models import build_model

pytestmark = pytest.mark.usefixtures("one_thread")

ARCH = {"name": "resnet8", "num_classes": 4, "shortcut": "A"}


def config_text(over: dict | None = None) -> str:
    """The tiny config (updated) as YAML, its out_dir `@TMP@/runs` (filled in per test)."""
    cfg = deep_update({**TINY, "out_dir": "@TMP@/runs"}, over or {})
    return yaml.safe_dump(cfg, sort_keys=False)


def sensitivity_config() -> str:
    """pretrain -> sens (sensitivity) -> prune with layer_ratios_from: sens."""
    cfg = deep_update(TINY, {"out_dir": "@TMP@/runs"})
    prune = {k: v for k, v in cfg["stages"]["prune"].items() if k != "ratio"}
    cfg["stages"] = {"pretrain": cfg["stages"]["pretrain"],
                     "sens": {"type": "sensitivity", "from": "pretrain"},
                     "prune": {**prune, "layer_ratios_from": "sens"}}
    return yaml.safe_dump(cfg, sort_keys=False)


def cuda(available: bool, count: int = 0) -> AbstractContextManager:
    """torch.cuda as on a machine with `count` GPUs (or none)."""
    return mock.patch.multiple(torch.cuda, is_available=mock.Mock(return_value=available),
                               device_count=mock.Mock(return_value=count))


@dataclass
class Case:
    """`files` (relative to the test folder; str or bytes, @TMP@ replaced) are written, then
    the CLI runs `args` (@TMP@ and @RUN@, the completed run, replaced) under `patch`."""

    id: str
    files: dict[str, str | bytes]
    args: list[str]
    code: int
    names: list[str]
    patch: Callable[[], AbstractContextManager] = nullcontext
    absent: list[str] = field(default_factory=list)  # text the line must not hold


SUGGESTED = "runs/tiny/sens/suggested.yaml"
DRY = ["run", "@TMP@/c.yaml", "--dry-run"]


def dry(over: dict | None = None, **kw) -> dict:
    return {"files": {"c.yaml": config_text(over)}, "args": DRY, **kw}


def bad_suggested(body: str | bytes) -> dict:
    return {"files": {"c.yaml": sensitivity_config(), SUGGESTED: body}, "args": DRY}


CASES = [
    # 8: base chains that come back on themselves
    Case("8-base-self", {"c.yaml": "base: c.yaml\nname: x\n"}, DRY, 2, ["c.yaml", "base", "cycle"]),
    Case("8-base-pair", {"c.yaml": "base: b.yaml\nname: x\n", "b.yaml": "base: c.yaml\n"}, DRY,
         2, ["base", "c.yaml -> ", "b.yaml -> ", "cycle"]),
    Case("8-base-chain", {"c.yaml": "base: d/e.yaml\nname: x\n", "d/e.yaml": "base: f.yaml\n",
                          "d/f.yaml": "base: ../c.yaml\n"}, DRY, 2, ["e.yaml", "f.yaml", "cycle"]),
    # 9: a device that is not a device, or not on this machine (config and flags)
    Case("9-device-bogus", **dry({"device": "bogus"}), code=2, names=["c.yaml", "device", "bogus"]),
    Case("9-device-cuda-absent", **dry({"device": "cuda"}), code=2,
         names=["c.yaml", "device", "CUDA is not available"], patch=lambda: cuda(False)),
    Case("9-device-cuda-index", **dry({"device": "cuda:3"}), code=2,
         names=["c.yaml", "device", "cuda:3", "1 visible GPU"], patch=lambda: cuda(True, 1)),
    Case("9-device-list", **dry({"device": ["cpu"]}), code=2, names=["c.yaml", "device"]),
    Case("9-eval-device", {}, ["eval", "@RUN@/pretrain", "--device", "gpu0"], 2,
         ["--device", "gpu0"]),
    Case("9-eval-cuda-absent", {}, ["eval", "@RUN@/pretrain", "--device", "cuda"], 2,
         ["--device", "CUDA"], patch=lambda: cuda(False)),
    Case("9-compare-latency-device", {}, ["compare", "@RUN@", "--latency", "--latency-device",
                                          "cuda:7", "--out", "@TMP@/report"], 2,
         ["--latency-device", "cuda:7"], patch=lambda: cuda(True, 2)),
    # 10: NaN and inf in every number
    Case("10-ratio-nan", **dry({"stages": {"prune": {"ratio": float("nan")}}}), code=2,
         names=["stages.prune.ratio", "finite"]),
    Case("10-lr-inf", **dry({"stages": {"pretrain": {"lr": float("inf")}}}), code=2,
         names=["stages.pretrain.lr", "finite"]),
    Case("10-momentum-nan", **dry({"stages": {"pretrain": {"optimizer": {
        "momentum": float("nan")}}}}), code=2, names=["stages.pretrain.optimizer.momentum"]),
    Case("10-weight-decay-nan", **dry({"stages": {"finetune": {"optimizer": {
        "weight_decay": float("nan")}}}}), code=2,
        names=["stages.finetune.optimizer.weight_decay"]),
    Case("10-iterative-ratio-nan", **dry({"stages": {"it": {
        "type": "iterative", "from": "pretrain", "ratio": float("nan")}}}), code=2,
        names=["stages.it.ratio", "finite"]),
    Case("10-nan-as-text", **dry({"data": {"max_unreadable": "nan"}}), code=2,
         names=["data.max_unreadable", "finite"]),
    # 11: a config that is not UTF-8
    Case("11-config-not-utf8", {"c.yaml": b"name: caf\xe9\nstages: {}\n"}, DRY, 2,
         ["c.yaml", "UTF-8"]),
    # 12: a malformed suggested.yaml behind layer_ratios_from
    Case("12-suggested-bad-yaml", **bad_suggested("layer_ratios: {a: 1\n"), code=2,
         names=["suggested.yaml", "invalid YAML"]),
    Case("12-suggested-list", **bad_suggested("- 0.5\n"), code=2,
         names=["suggested.yaml", "expected a mapping"]),
    Case("12-suggested-string-ratio", **bad_suggested("layer_ratios: {layer1.0.conv1: half}\n"),
         code=2, names=["suggested.yaml", "layer_ratios.layer1.0.conv1"]),
    Case("12-suggested-skip-int", **bad_suggested("skip: 7\n"), code=2,
         names=["suggested.yaml", "skip"]),
    Case("12-suggested-binary", **bad_suggested(b"\xff\xfe\x00\x01"), code=2,
         names=["suggested.yaml", "UTF-8"]),
    # 13: wrong-typed values where a string is expected; hand-made checkpoints
    Case("13-nul-in-name", **dry({"name": "a\0b"}), code=2, names=["c.yaml", "name"]),
    Case("13-nul-in-data-root", **dry({"data": {"root": "da\0ta"}}), code=2,
         names=["data.root", "NUL"]),
    Case("13-type-list", **dry({"stages": {"prune": {"type": ["prune"]}}}), code=2,
         names=["stages.prune.type", "expected a stage type name"]),
    Case("13-type-mapping", **dry({"stages": {"prune": {"type": {"a": 1}}}}), code=2,
         names=["stages.prune.type"]),
    Case("13-from-list", **dry({"stages": {"prune": {"from": ["pretrain"]}}}), code=2,
         names=["stages.prune.from", "expected a string"]),
    Case("13-eval-no-arch", {}, ["eval", "@RUN@/pretrain", "--checkpoint", "@TMP@/x.pt"], 2,
         ["x.pt", "lacks 'arch'"]),
    Case("13-eval-arch-string", {}, ["eval", "@RUN@/pretrain", "--checkpoint", "@TMP@/s.pt"], 2,
         ["s.pt", "arch"]),
    Case("13-eval-state-dict-list", {}, ["eval", "@RUN@/pretrain", "--checkpoint",
                                         "@TMP@/l.pt"], 2, ["l.pt", "state_dict"]),
    Case("13-eval-misfit", {}, ["eval", "@RUN@/pretrain", "--checkpoint", "@TMP@/m.pt"], 2,
         ["m.pt", "do not fit", "conv1.weight"]),
    Case("13-eval-shapes-do-not-chain", {}, ["eval", "@RUN@/pretrain", "--checkpoint",
                                             "@TMP@/w.pt"], 2, ["w.pt", "working network"]),
    Case("13-export-hand-made", {}, ["export", "@RUN@/handmade", "--format", "torchscript",
                                     "--out", "@TMP@/o.pt"], 2, ["handmade/model.pt", "arch"]),
    # 14: a pickle that would run a command, a truncated file
    Case("14-eval-malicious", {}, ["eval", "@RUN@/pretrain", "--checkpoint", "@TMP@/evil.pt"],
         2, ["evil.pt: refused: it asks to import os.system"], absent=["weights_only"]),
    Case("14-export-malicious", {}, ["export", "@RUN@/evil", "--format", "torchscript",
                                     "--out", "@TMP@/o.pt"], 2,
         ["evil/model.pt: refused: it asks to import os.system"]),
    Case("14-eval-truncated", {}, ["eval", "@RUN@/pretrain", "--checkpoint", "@TMP@/cut.pt"],
         2, ["cut.pt", "truncated"], absent=["Errno", "miniz"]),
    # 15: val_split that holds out everything or nothing
    Case("15-val-split-one", **dry({"data": {"val_split": 1.0}}), code=2,
         names=["c.yaml", "data.val_split", "below 1"]),
    Case("15-val-split-all", **dry({"data": {"val_split": 96}}), code=2,
         names=["c.yaml", "data.val_split", "96 of the 96 training images"]),
    Case("15-val-split-none", **dry({"data": {"val_split": 0.001}}), code=2,
         names=["c.yaml", "data.val_split", "of the 96 training images holds out none"]),
    # 16: duplicate keys; stop_below is a percentage
    Case("16-duplicate-key", {"c.yaml": "name: a\nseed: 1\nname: b\n"}, DRY, 2,
         ["c.yaml", "line 3", "duplicate key 'name'", "line 1"]),
    Case("16-duplicate-nested", {"c.yaml": config_text().replace(
        "    epochs: 2\n", "    epochs: 2\n    epochs: 3\n", 1)}, DRY, 2,
        ["c.yaml", "duplicate key 'epochs'"]),
    Case("16-stop-below-over-100", **dry({"stages": {"it": {
        "type": "iterative", "from": "pretrain", "stop_below": 150}}}), code=2,
        names=["stages.it.stop_below", "[0, 100]"]),
    Case("16-stop-below-negative", **dry({"stages": {"it": {
        "type": "iterative", "from": "pretrain", "stop_below": -1}}}), code=2,
        names=["stages.it.stop_below"]),
    # 17: a snapshot after the stage's last epoch
    Case("17-save-epochs", **dry({"stages": {"pretrain": {"save_epochs": [1, 2]}}}), code=2,
         names=["stages.pretrain.save_epochs", "epoch 2", "trains 2 epoch"]),
    # 18: --dry-run --stage with a typo
    Case("18-dry-run-stage", {"c.yaml": config_text()}, [*DRY, "--stage", "pretrian"], 2,
         ["--stage pretrian", "did you mean 'pretrain'", "finetune"]),
    # 19: opsets outside the exporter's range
    Case("19-opset-0", {}, ["export", "@RUN@/pretrain", "--format", "onnx", "--opset", "0",
                            "--out", "@TMP@/m.onnx"], 2, ["--opset 0", "10 to 20"]),
    Case("19-opset-999", {}, ["export", "@RUN@/pretrain", "--format", "onnx", "--opset", "999",
                              "--out", "@TMP@/m.onnx"], 2, ["--opset 999", "10 to 20"]),
    # 20: errors that name the file (val_split and suggested.yaml above: c.yaml, the file)
    Case("20-suggested-range", **bad_suggested("layer_ratios: {layer1.0.conv1: 1.5}\n"),
         code=2, names=["suggested.yaml", "layer_ratios.layer1.0.conv1", "(0, 1)"]),
    Case("20-export-disk-full", {"out/keep.txt": "x"},
         ["export", "@RUN@/pretrain", "--format", "torchscript", "--out", "@TMP@/out/m.pt"], 1,
         ["out/m.pt: cannot write the export", "No space left on device", "bytes"],
         patch=lambda: mock.patch.object(atomic.os, "fsync", side_effect=OSError(
             errno.ENOSPC, os.strerror(errno.ENOSPC))), absent=[".tmp"]),
    Case("20-export-permission", {"out/keep.txt": "x"},
         ["export", "@RUN@/pretrain", "--format", "torchscript", "--out", "@TMP@/out/m.pt"], 2,
         ["out/m.pt: cannot write the export", "Permission denied"],
         patch=lambda: mock.patch.object(atomic, "tempfile", SimpleNamespace(
             mkstemp=mock.Mock(side_effect=PermissionError(
                 errno.EACCES, os.strerror(errno.EACCES), "out/.m.pt.x1y2.tmp")))),
         absent=[".tmp"]),
    # 21: an empty config wants only a name
    Case("21-empty-config", {"c.yaml": ""}, DRY, 2, ["c.yaml", "name"],
         absent=["out_dir", "deterministic", "distributed"]),
    # 22: out_dir where no run directory can be made
    Case("22-out-dir-proc", **dry({"out_dir": "/proc/pipeline-runs"}), code=2,
         names=["c.yaml", "out_dir", "/proc"]),
    Case("22-out-dir-under-a-file", {"c.yaml": config_text({"out_dir": "@TMP@/f/runs"}),
                                     "f": "not a folder"}, DRY, 2, ["out_dir", "not a folder"]),
]


class Evil:
    """Unpickled, runs `touch MARKER`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture(scope="module")
def made_run(tmp_path_factory) -> Path:
    """A run directory with a completed-looking stage (a fresh resnet8 as model.pt), a
    hand-made stage and a malicious one; and the hand-made checkpoints beside it."""
    root = tmp_path_factory.mktemp("made")
    run = root / "runs" / "tiny"
    (run / "pretrain").mkdir(parents=True)
    cfg = deep_update(TINY, {"out_dir": str(root / "runs")})
    (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    torch.manual_seed(0)
    model = build_model(ARCH)
    ckpt.save_model(run / "pretrain" / "model.pt", model, ARCH, {"stage": "pretrain"})
    good = ckpt.load(run / "pretrain" / "model.pt")
    sd = good["state_dict"]
    hand = root / "hand"
    hand.mkdir()
    torch.save({"schema": 1, "kind": "model", "state_dict": sd}, hand / "x.pt")
    torch.save({**good, "arch": "resnet8"}, hand / "s.pt")
    torch.save({**good, "state_dict": [1, 2]}, hand / "l.pt")
    torch.save({**good, "state_dict": {k: v for k, v in sd.items() if k != "conv1.weight"}},
               hand / "m.pt")
    torch.save({**good, "state_dict": {**sd, "conv1.weight": sd["conv1.weight"][:8]}},
               hand / "w.pt")
    (run / "handmade").mkdir()
    torch.save({"schema": 1, "kind": "model", "arch": [], "state_dict": sd},
               run / "handmade" / "model.pt")
    data = (run / "pretrain" / "model.pt").read_bytes()
    (hand / "cut.pt").write_bytes(data[: len(data) // 2])
    _evil(hand / "evil.pt", root / "pwned")
    (run / "evil").mkdir()
    _evil(run / "evil" / "model.pt", root / "pwned")
    return root


def _evil(path: Path, marker: Path) -> None:
    """A checkpoint-looking file whose unpickling would create `marker`."""
    torch.save({"schema": 1, "kind": "model", "x": Evil(marker)}, path)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(case: Case, tmp_path, made_run, cli, outside_untouched):
    run = made_run / "runs" / "tiny"
    for name, body in case.files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(body, str):
            path.write_text(body.replace("@TMP@", str(tmp_path)), encoding="utf-8")
        else:
            path.write_bytes(body)
    for f in (made_run / "hand").iterdir():
        shutil.copy(f, tmp_path / f.name)
    outside_untouched(tmp_path, tmp_path / "runs" / "tiny")
    outside_untouched(made_run)
    args = [a.replace("@TMP@", str(tmp_path)).replace("@RUN@", str(run)) for a in case.args]
    with case.patch():
        code, out, err = cli(*args)
    lines = err.strip().splitlines()
    assert code == case.code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for text in case.names:
        assert text in lines[0], lines[0]
    for text in case.absent:
        assert text not in lines[0], lines[0]
    assert not (made_run / "pwned").exists(), "the malicious pickle ran its command"


def test_every_class_has_a_case():
    assert {int(c.id.split("-")[0]) for c in CASES} == set(range(8, 23))


def test_refusal_names_the_import_and_runs_nothing(tmp_path):
    """The malicious pickle would create a file; loading refuses it, says what it asked to
    import, and the file is never created."""
    marker = tmp_path / "pwned"
    _evil(tmp_path / "evil.pt", marker)
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(tmp_path / "evil.pt")
    assert str(err.value) == (f"{tmp_path / 'evil.pt'}: refused: it asks to import os.system "
                              "(not a plain checkpoint; nothing in it was run)")
    assert not marker.exists()


@pytest.mark.parametrize("keep", [0, 1, 10, 1000, -30, -1])
def test_truncated_checkpoint_says_truncated(tmp_path, keep):
    path = tmp_path / "m.pt"
    ckpt.save_model(path, build_model(ARCH), ARCH)
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(ckpt.CheckpointError) as err:
        ckpt.load(path)
    text = str(err.value)
    assert text.startswith(f"{path}: ") and "\n" not in text
    why = text.removeprefix(f"{path}: ")  # the test's folder name holds "truncated" too
    assert why.startswith("empty file" if keep == 0 else "not a torch checkpoint" if keep == 1
                          else "truncated:"), why


def test_export_sidecar_failure_takes_the_new_file_with_it(made_run, tmp_path, cli,
                                                          outside_untouched):
    """TorchScript writes the model and a .json sidecar; a sidecar that cannot be written
    leaves neither behind, and the error names the sidecar."""
    real = atomic.tempfile.mkstemp

    def deny_json(*args, **kwargs):
        if kwargs.get("prefix", "").endswith(".json."):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), "hidden.tmp")
        return real(*args, **kwargs)

    outside_untouched(tmp_path)
    outside_untouched(made_run)
    with mock.patch.object(atomic, "tempfile", SimpleNamespace(mkstemp=deny_json)):
        code, _, err = cli("export", made_run / "runs/tiny/pretrain", "--format",
                           "torchscript", "--out", tmp_path / "m.pt")
    assert code == 2, err
    assert err.strip() == (f"error: {tmp_path / 'm.pt.json'}: cannot write the export "
                           "(Permission denied)")


def test_damaged_metrics_csv_is_set_aside_on_resume(tmp_path, tiny_config, cli,
                                                   outside_untouched, one_thread):
    """A binary metrics.csv of an interrupted stage: the resume renames it beside itself
    (bytes intact), warns, and finishes the stage with a fresh log."""
    path = tiny_config()
    code, _, err = cli("run", path, "--stage", "pretrain")
    assert code == 0, err
    stage = tmp_path / "runs" / "tiny" / "pretrain"
    (stage / "summary.json").unlink()  # interrupted after its first epoch's checkpoint
    (stage / "model.pt").unlink()
    (stage / "last.prev.pt").replace(stage / "last.pt")
    junk = bytes(range(256)) * 4
    (stage / "metrics.csv").write_bytes(junk)
    outside_untouched(tmp_path, tmp_path / "runs" / "tiny")
    code, _, err = cli("run", path, "--stage", "pretrain")
    assert code == 0, err
    assert "metrics.csv: not a readable CSV log" in err and "metrics.csv.damaged" in err
    assert (stage / "metrics.csv.damaged").read_bytes() == junk
    assert (stage / "model.pt").is_file()
    rows = (stage / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("epoch,") and rows[1].startswith("1,") and len(rows) == 2, rows
