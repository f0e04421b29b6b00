"""The quantize stage: int8 arithmetic checked by hand, the calibration set's refusals, the
config's strictness, the check that writes nothing when it fails, QAT resumed bitwise, and a
whole tiny run with both backends."""

from __future__ import annotations

import json
import shutil
import signal

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml
from test_resume import assert_bitwise_equal, run_cli, run_in_process

from conftest import TINY, deep_update
from pipeline import checkpoint as ckpt
from pipeline.models import load_model
from pipeline.quantize import CalibrationError, attach_fake_quant, backend_of, check_calibration
from pipeline.quantize import ort as ort_backend
from pipeline.quantize import pt2e as pt2e_backend
from pipeline.quantize.fakequant import act_qparams

pytestmark = pytest.mark.usefixtures("one_thread")

CALIB = {"batches": 2, "batch_size": 16}
LOOSE = {"min_agreement": 0.5, "max_top1_drop": 50}  # a 2-epoch model on noise: near ties
QUANT = {
    "data": {"val_split": 16},
    "stages": {
        "pretrain": {"epochs": 1},
        "ptq": {"type": "quantize", "from": "pretrain", "calibration": CALIB, "verify": LOOSE},
    },
}


def _config(tmp_path, over: dict | None = None, drop=("prune", "finetune")) -> str:
    cfg = deep_update(deep_update(TINY, QUANT), over or {})
    for name in drop:
        cfg["stages"].pop(name, None)
    cfg["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return str(path)


# ---------------------------------------------------------------- int8 arithmetic by hand


def _quant_act(x: torch.Tensor, scale: float, zero: int) -> torch.Tensor:
    """uint8 quantize-dequantize, written out."""
    return (torch.clamp(torch.round(x / scale) + zero, 0, 255) - zero) * scale


def _minmax_qparams(t: torch.Tensor) -> tuple[float, int]:
    lo, hi = min(float(t.min()), 0.0), max(float(t.max()), 0.0)
    scale = (hi - lo) / 255
    return scale, int(round(-lo / scale))


class OneConv(nn.Module):
    """A 3x3 conv whose output map is the model's output: the quantized conv is observable."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return self.conv(x).flatten(1)


def test_onnxruntime_conv_matches_scale_and_zero_point_by_hand(tmp_path):
    torch.manual_seed(0)
    model = OneConv().eval()
    calib = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    # 7-bit weights: exact on every CPU (full-range weights saturate the int16 pair sums of
    # onnxruntime's AVX2 kernels on CPUs without VNNI, which is why reduce_range exists)
    data = ort_backend.OrtBackend().quantize(model, calib, "minmax", 99.999, {}, tmp_path,
                                             reduce_range=True)
    x = torch.randn(5, 3, 6, 6)
    got = ort_backend.OrtBackend().runner(data)(x)
    # by hand: activations uint8 from the calibration set's min/max (widened to 0), weights
    # int8 per output channel symmetric (max |w| / 64), bias int32 at scale s_x * s_w
    s_x, z_x = _minmax_qparams(torch.cat(calib))
    w = model.conv.weight.detach()
    s_w = w.abs().flatten(1).amax(1) / 64
    w_q = torch.round(w / s_w.view(-1, 1, 1, 1)).clamp(-64, 64)
    b_q = torch.round(model.conv.bias.detach() / (s_x * s_w))
    with torch.no_grad():
        ref_out = torch.cat([model(c) for c in calib])
    s_y, z_y = _minmax_qparams(ref_out)
    acc = F.conv2d(_quant_act(x, s_x, z_x), w_q * s_w.view(-1, 1, 1, 1), b_q * s_x * s_w,
                   padding=1)
    expected = _quant_act(acc.flatten(1), s_y, z_y)
    # onnxruntime requantizes the int32 accumulator in its own float order: a value on a
    # rounding boundary may land one output step away, never more
    diff = (got - expected).abs()
    assert float(diff.max()) <= s_y * 1.001
    assert float((diff > 1e-6).float().mean()) < 0.02
    assert not torch.allclose(got, model(x).detach(), atol=1e-6)  # it did quantize


@pytest.mark.parametrize("backend", ["onnxruntime", "pt2e"])
def test_learned_ranges_replace_the_calibrated_ones(tmp_path, backend):
    """QAT's learned input range of a layer is the int8 model's input scale and zero point
    for that layer, in both backends; without it the calibration set's min/max is."""
    torch.manual_seed(0)
    model = OneConv().eval()
    calib = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    for ranges, lo, hi in ((None, float(torch.cat(calib).min()), float(torch.cat(calib).max())),
                           ({"conv": (-1.0, 3.0)}, -1.0, 3.0)):
        meta = {}
        data = backend_of(backend).quantize(model, calib, "minmax", 99.999, meta, tmp_path,
                                            reduce_range=True, ranges=ranges)
        scale, zero = _input_qparams(backend, data)
        assert scale == pytest.approx((hi - lo) / 255, rel=1e-5)
        assert zero == round(-lo / ((hi - lo) / 255))
        assert meta.get("learned_ranges") == (1 if ranges else None)


def _input_qparams(backend: str, data: bytes) -> tuple[float, int]:
    """The (scale, zero point) an int8 artifact quantizes its input with."""
    if backend == "onnxruntime":
        import onnx
        from onnx import numpy_helper

        proto = onnx.load_from_string(data)
        inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
        q = next(n for n in proto.graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] == "input")
        return float(inits[q.input[1]]), int(inits[q.input[2]])
    import io

    program = torch.export.load(io.BytesIO(data))
    q = next(n for n in program.graph.nodes if "quantize_per_tensor" in str(n.target))
    return float(q.args[1]), int(q.args[2])


def test_every_resnet_layer_input_is_found_in_the_onnx_graph(tmp_path):
    """Each Conv2d/Linear of a ResNet-20 maps to the tensor its ONNX node reads (the graph
    input for the stem, a ReLU output for the others), a weight used through F.linear (no
    module) is skipped, and names not in the graph are reported, not guessed."""
    import onnx

    from pipeline.models import build_model
    from pipeline.quantize.base import layer_calls

    class WithFunctionalHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build_model({"name": "resnet20", "num_classes": 10, "shortcut": "A"})
            self.extra = nn.Parameter(torch.randn(10, 10))

        def forward(self, x):
            return F.linear(self.net(x), self.extra)

    model = WithFunctionalHead().eval()
    x = torch.randn(2, 3, 32, 32)
    path = tmp_path / "m.onnx"
    ort_backend.export_fp32(model, x, path)
    calls = layer_calls(model, x)
    inputs = ort_backend.layer_inputs(onnx.load(str(path)), calls)
    layers = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert len(layers) == 20 and sorted(inputs) == sorted(layers)
    assert inputs["net.conv1"] == ["input"]
    assert all(len(v) == 1 for v in inputs.values())
    assert len({v[0] for v in inputs.values()}) == 20  # no two layers read one tensor here
    overrides, missing = ort_backend.range_overrides(
        inputs, {"net.conv1": (-2.0, 2.0), "net.fc": (0.0, 5.0), "gone.conv": (0.0, 1.0)})
    assert missing == ["gone.conv"]
    assert overrides["input"] == [{"rmin": -2.0, "rmax": 2.0}]
    assert overrides[inputs["net.fc"][0]] == [{"rmin": 0.0, "rmax": 5.0}]
    # a tensor read by two layers gets the union of their ranges
    both, _ = ort_backend.range_overrides({"a": ["t"], "b": ["t"]},
                                          {"a": (-1.0, 2.0), "b": (-3.0, 1.0)})
    assert both == {"t": [{"rmin": -3.0, "rmax": 2.0}]}


def test_pt2e_finds_every_resnet_layer_input(tmp_path, caplog):
    from pipeline.models import build_model

    model = build_model({"name": "resnet20", "num_classes": 10, "shortcut": "A"}).eval()
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    meta = {}
    ranges = {n: (-1.0, 1.0) for n in names} | {"not.a.layer": (0.0, 1.0)}
    pt2e_backend.Pt2eBackend().quantize(model, [torch.randn(4, 3, 32, 32)], "minmax", 99.999,
                                        meta, tmp_path, ranges=ranges)
    assert meta["learned_ranges"] == len(names) == 20
    assert any("not.a.layer" in r.getMessage() for r in caplog.records)


def test_int8_dot_detection_reads_the_cpu_flags():
    assert not ort_backend.has_int8_dot("flags\t: fpu sse2 avx2 fma\n")
    assert ort_backend.has_int8_dot("flags\t: fpu sse2 avx2 avx512_vnni\n")
    assert ort_backend.has_int8_dot("Features\t: fp asimd asimddp\n")  # Arm


def test_fake_quant_conv_matches_hand_computation():
    torch.manual_seed(1)
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(2, 3, 5, 5)
    plain_w, plain_b = conv.weight.detach().clone(), conv.bias.detach().clone()
    holder = nn.Sequential(conv)
    attach_fake_quant(holder)
    holder.train()
    out = holder(x)  # first batch: the range is this batch's min/max
    s_x, z_x = _minmax_qparams(x)
    scale, zero = act_qparams(x.min(), x.max())
    assert float(scale) == pytest.approx(s_x, rel=1e-6) and int(zero) == z_x
    s_w = plain_w.abs().flatten(1).amax(1) / 127
    w_dq = torch.round(plain_w / s_w.view(-1, 1, 1, 1)).clamp(-127, 127) * s_w.view(-1, 1, 1, 1)
    expected = F.conv2d(_quant_act(x, s_x, z_x), w_dq, plain_b, padding=1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    out.sum().backward()  # straight-through: the weight gets a gradient
    assert conv.weight.grad is not None and float(conv.weight.grad.abs().sum()) > 0


# ---------------------------------------------------------------- calibration refusals


@pytest.mark.parametrize("batches, what", [
    ([], "empty"),
    ([torch.zeros(0, 3, 16, 16)], "batch 0 is empty"),
    ([torch.zeros(4, 3, 16, 16), torch.zeros(4, 3, 8, 8)], "batch 1 has shape"),
    ([torch.zeros(4, 1, 16, 16)], "the model takes (N, 3, 16, 16)"),
    ([torch.full((2, 3, 16, 16), float("nan"))], "non-finite"),
])
def test_bad_calibration_set_is_refused(batches, what):
    with pytest.raises(CalibrationError, match=None) as err:
        check_calibration(batches, (3, 16, 16), "stages.q.calibration")
    assert what in str(err.value) and err.value.exit_code == 2


def test_good_calibration_set_is_counted():
    assert check_calibration([torch.zeros(4, 3, 16, 16)] * 3, (3, 16, 16)) == 12


@pytest.mark.parametrize("over, key, words", [
    ({"calibration": {"batches": 50, "batch_size": 16}}, "stages.ptq.calibration",
     "800 images, the train split holds 80"),
    ({"calibration": {"split": "val", "batches": 2, "batch_size": 16}},
     "stages.ptq.calibration", "the val split holds 16"),
    ({"calibration": {"batchez": 2}}, "stages.ptq.calibration.batchez", "did you mean 'batches'"),
    ({"calibration": {"batches": 0}}, "stages.ptq.calibration.batches", "in [1, 100000]"),
    ({"verify": {"min_agreement": 1.5}}, "stages.ptq.verify.min_agreement", "in [0, 1]"),
    ({"verify": {"max_top1_drop": float("inf")}}, "stages.ptq.verify.max_top1_drop", "finite"),
    ({"verify": {"max_top1_drop": float("nan")}}, "stages.ptq.verify.max_top1_drop", "finite"),
    ({"percentile": float("nan")}, "stages.ptq.percentile", "finite"),
    ({"percentile": 100}, "stages.ptq.percentile", "in (50, 100)"),
    ({"observer": "kl"}, "stages.ptq.observer", "expected one of"),
    ({"backend": "tensorrt"}, "stages.ptq.backend", "expected one of"),
    ({"method": "dynamic"}, "stages.ptq.method", "expected one of"),
    ({"backend": "pt2e", "reduce_range": True}, "stages.ptq.reduce_range", "onnxruntime only"),
    ({"epochs": 3}, "stages.ptq.epochs", "only with method: qat"),
    ({"distill": {"from": "pretrain"}}, "stages.ptq.distill", "only with method: qat"),
])
def test_config_errors_name_the_key(tmp_path, cli, over, key, words):
    code, out, err = cli("run", _config(tmp_path, {"stages": {"ptq": over}}), "--dry-run")
    assert code == 2, err
    line = err.strip()
    assert "\n" not in line and key in line and words in line, line


def test_val_calibration_needs_a_validation_split(tmp_path, cli):
    cfg = _config(tmp_path, {"data": {"val_split": None},
                             "stages": {"ptq": {"calibration": {"split": "val"}}}})
    code, _, err = cli("run", cfg, "--dry-run")
    assert code == 2 and "stages.ptq.calibration.split: val needs data.val_split" in err


def test_missing_backend_package_is_a_preflight_error(tmp_path, cli, monkeypatch):
    def missing():
        raise pt2e_backend.MissingBackendError("backend pt2e needs torchao (no module): "
                                               "pip install 'prune-pipeline[quantize]'")

    monkeypatch.setattr(pt2e_backend, "_packages", missing)
    code, _, err = cli("run", _config(tmp_path, {"stages": {"ptq": {"backend": "pt2e"}}}),
                       "--dry-run")
    assert code == 2
    assert "stages.ptq.backend: backend pt2e needs torchao" in err and "pip install" in err


def test_quantize_needs_a_stage_with_a_model(tmp_path, cli):
    cfg = _config(tmp_path, {"stages": {"again": {"type": "quantize", "from": "ptq",
                                                  "calibration": CALIB}}})
    code, _, err = cli("run", cfg, "--dry-run")
    assert code == 2 and "stages.again.from: stage 'ptq' writes no model to quantize" in err


def test_no_stage_takes_a_ptq_stage_as_input(tmp_path, cli):
    cfg = _config(tmp_path, {"stages": {"ft": {"type": "finetune", "from": "ptq", "lr": 0.01}}})
    code, _, err = cli("run", cfg, "--dry-run")
    assert code == 2 and "stages.ft.from: stage 'ptq' writes no model.pt to take" in err


# ---------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def quantized(tmp_path_factory, one_thread_module):
    """pretrain, then PTQ (onnxruntime, minmax), QAT (onnxruntime) and PTQ (pt2e,
    percentile, calibrated on the validation split) of its model."""
    base = tmp_path_factory.mktemp("quantize")
    cfg = _config(base, {"stages": {
        "qat": {"type": "quantize", "from": "pretrain", "method": "qat", "epochs": 1,
                "batch_size": 32, "lr": 0.01, "calibration": CALIB, "verify": LOOSE,
                "checkpoint_every_steps": 1},
        "ptq_pt2e": {"type": "quantize", "from": "pretrain", "backend": "pt2e",
                     "observer": "percentile", "verify": LOOSE,
                     "calibration": {"split": "val", "batches": 1, "batch_size": 16}}}})
    code, err = run_in_process(cfg)
    assert code == 0, err
    return cfg, base / "runs" / "tiny"


@pytest.fixture(scope="module")
def one_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _summary(run_dir, stage) -> dict:
    return json.loads((run_dir / stage / "summary.json").read_text())


def _test_images(run_dir):
    """The run's whole test split, as the stage evaluated it."""
    from pipeline.config import Loader
    from pipeline.data import DataConfig, build_data

    plain = yaml.safe_load((run_dir / "config.yaml").read_text())
    data = Loader("config").load(DataConfig, plain["data"], "data")
    bundle = build_data(data, 64, 64, 0, torch.device("cpu"))
    return [(x, y) for x, y in bundle.test]


@pytest.mark.parametrize("stage, suffix", [("ptq", ".onnx"), ("qat", ".onnx"),
                                           ("ptq_pt2e", ".pt2")])
def test_artifact_loads_in_its_runtime_and_matches_the_summary(quantized, stage, suffix):
    _, run_dir = quantized
    s = _summary(run_dir, stage)
    path = run_dir / stage / f"model.int8{suffix}"
    assert s["status"] == "completed" and s["precision"] == "int8" and path.is_file()
    assert s["artifact"] == path.name and s["artifact_bytes"] == path.stat().st_size
    assert s["verification"]["passed"] and s["verification"]["images"] == 64
    assert s["val_top1"] is not None and s["source_top1"] == _summary(run_dir, "pretrain")["top1"]
    assert s["calibration"]["images"] == (16 if stage == "ptq_pt2e" else 32)
    if suffix == ".onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        run = lambda x: torch.from_numpy(session.run(None, {"input": x.numpy()})[0])  # noqa: E731
        ops = {n.op_type for n in __import__("onnx").load(str(path)).graph.node}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    else:
        module = torch.export.load(str(path)).module()
        run = lambda x: module(x).detach()  # noqa: E731
    correct = sum(int((run(x).argmax(1) == y).sum()) for x, y in _test_images(run_dir))
    assert 100 * correct / 64 == pytest.approx(s["top1"])


def test_qat_writes_its_trained_fp32_weights(quantized):
    _, run_dir = quantized
    model = load_model(run_dir / "qat" / "model.pt")  # plain keys: the observers dropped
    before = load_model(run_dir / "pretrain" / "model.pt")
    assert set(model.state_dict()) == set(before.state_dict())
    assert not torch.equal(model.state_dict()["conv1.weight"], before.state_dict()["conv1.weight"])
    s = _summary(run_dir, "qat")
    assert s["epochs"] == 1 and s["train_precision"] == "fp32" and s["fake_quant_top1"] is not None
    last = ckpt.load(run_dir / "qat" / "last.pt")["state_dict"]
    assert "conv1.act_fq.lo" in last  # the checkpoints carry the observers: exact resume


def test_qat_check_agrees_with_the_fake_quantized_model_it_imitates(quantized):
    """After QAT the int8 model is checked against the trained fake-quantized network (the
    computation it imitates), not the plain fp32 weights: the recorded agreement is that
    of the fake-quantized model rebuilt here from last.pt, on the same test images."""
    import onnxruntime

    _, run_dir = quantized
    s = _summary(run_dir, "qat")
    v = s["verification"]
    assert v["agreement_with"] == "fake-quantized QAT"
    assert _summary(run_dir, "ptq")["verification"]["agreement_with"] == "fp32"
    fq = load_model(run_dir / "pretrain" / "model.pt")
    attach_fake_quant(fq, wmax=64 if s["reduce_range"] else 127)
    fq.load_state_dict(ckpt.load(run_dir / "qat" / "last.pt")["state_dict"], strict=True)
    fq.eval()
    session = onnxruntime.InferenceSession(str(run_dir / "qat" / "model.int8.onnx"),
                                           providers=["CPUExecutionProvider"])
    agree = correct = n = 0
    with torch.no_grad():
        for x, y in _test_images(run_dir):
            a = fq(x).argmax(1)
            b = torch.from_numpy(session.run(None, {"input": x.numpy()})[0]).argmax(1)
            agree += int((a == b).sum())
            correct += int((a == y).sum())
            n += len(y)
    assert n == v["images"]
    assert v["agreement"] == pytest.approx(agree / n)
    assert v["fp32_top1"] == pytest.approx(100 * correct / n)
    # every fake-quantized layer's input kept the range it trained with
    layers = [m for m in fq.modules() if hasattr(m, "act_fq")]
    assert s["learned_ranges"] == len(layers) and _summary(run_dir, "ptq")["learned_ranges"] is None
    lo, hi = min(float(fq.conv1.act_fq.lo), 0.0), max(float(fq.conv1.act_fq.hi), 0.0)
    scale, _ = _input_qparams("onnxruntime", (run_dir / "qat" / "model.int8.onnx").read_bytes())
    assert scale == pytest.approx((hi - lo) / 255, rel=1e-5)


def test_failed_check_exits_1_and_writes_no_artifact(tmp_path, cli, monkeypatch):
    real = ort_backend.OrtBackend.runner

    def wrong(self, data, threads=None, compiled=False):
        run = real(self, data, threads, compiled)
        return lambda x: -run(x)  # a broken conversion: the classes reversed

    monkeypatch.setattr(ort_backend.OrtBackend, "runner", wrong)
    code, _, err = cli("run", _config(tmp_path, {"stages": {"ptq": {"verify": {
        "min_agreement": 0.9, "max_top1_drop": 1.0}}}}), "--progress", "off")
    stage_dir = tmp_path / "runs" / "tiny" / "ptq"
    assert code == 1, err
    assert "int8 check failed" in err and "nothing written" in err
    assert not list(stage_dir.glob("model.int8*")) and not (stage_dir / ".quantize_tmp").exists()
    assert _summary(tmp_path / "runs" / "tiny", "ptq")["status"] == "failed"


def test_killed_qat_resumes_bitwise(quantized, tmp_path):
    config, ref_dir = quantized
    cfg = yaml.safe_load(open(config).read())
    cfg["out_dir"] = str(tmp_path / "runs")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    run_dir = tmp_path / "runs" / "tiny"
    shutil.copytree(ref_dir / "pretrain", run_dir / "pretrain")
    killed = run_cli(path, "--stage", "qat", fault="qat:step:2")
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert ckpt.load(run_dir / "qat" / "last.pt")["global_step"] == 1
    assert not list((run_dir / "qat").glob("model.int8*"))
    code, err = run_in_process(path, "--stage", "qat")
    assert code == 0, err
    assert "resumed from" in err
    assert_bitwise_equal(ckpt.load(run_dir / "qat/model.pt")["state_dict"],
                         ckpt.load(ref_dir / "qat/model.pt")["state_dict"])
    assert_bitwise_equal(ckpt.load(run_dir / "qat/last.pt")["state_dict"],
                         ckpt.load(ref_dir / "qat/last.pt")["state_dict"])
    assert _summary(run_dir, "qat")["top1"] == _summary(ref_dir, "qat")["top1"]


@pytest.mark.slow
def test_qat_and_ptq_under_torchrun(tmp_path):
    """Two gloo processes: QAT trains under DDP, rank 0 converts and writes, both ranks end
    with the same summary."""
    from test_multirank import torchrun, write_config

    config = write_config(tmp_path, deep_update(QUANT, {"stages": {
        "prune": None, "finetune": None,
        "qat": {"type": "quantize", "from": "pretrain", "method": "qat", "epochs": 1,
                "batch_size": 32, "lr": 0.01, "calibration": CALIB, "verify": LOOSE}}}))
    cfg = yaml.safe_load(config.read_text())
    cfg["stages"] = {k: v for k, v in cfg["stages"].items() if v}
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    done, _ = torchrun(tmp_path, "run", str(config), "--progress", "off", timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "runs" / "tiny"
    for stage in ("ptq", "qat"):
        s = _summary(run_dir, stage)
        assert s["status"] == "completed" and s["verification"]["passed"]
        assert (run_dir / stage / s["artifact"]).stat().st_size == s["artifact_bytes"]
    load_model(run_dir / "qat" / "model.pt")  # plain keys: loads strictly


def test_compare_rows_and_latency_plot_of_quantized_stages(quantized, tmp_path):
    from pipeline.report import columns_for, plot_latency, rows_for, to_markdown

    _, run_dir = quantized
    rows = {r["stage"]: r for r in rows_for(run_dir)}
    base = _summary(run_dir, "pretrain")["top1"]
    for stage in ("ptq", "qat", "ptq_pt2e"):
        r, s = rows[stage], _summary(run_dir, stage)
        assert r["precision"] == "int8" and r["source"] == "pretrain"
        assert r["size_mb"] == pytest.approx(s["artifact_bytes"] / 1e6)
        assert r["delta_source"] == pytest.approx(s["top1"] - base)
        assert r["delta_top1"] == pytest.approx(s["top1"] - base)  # pretrain is the baseline
    assert rows["pretrain"]["precision"] == "fp32"
    cols = columns_for(list(rows.values()))
    assert cols.index("precision") == cols.index("model") + 1
    assert cols.index("delta_source") == cols.index("delta_top1") + 1
    table = to_markdown(list(rows.values()), cols)
    assert "Δ top-1 vs input" in table and "model file (MB)" in table and "| int8 |" in table
    timed = [{**r, "latency_ms": 10.0 + i} for i, r in enumerate(rows.values())]
    plot = plot_latency(timed, tmp_path / "lat.png")
    assert plot.path.is_file()
    assert plot.series["tiny/ptq"] == [(11.0, rows["ptq"]["top1"])]
    assert plot.series["tiny/ptq from"] == [(10.0, base), (11.0, rows["ptq"]["top1"])]


def test_onnxruntime_threads_stop_spinning_when_a_run_returns():
    """Every model the project loads in onnxruntime parks its intra-op threads when a run
    returns: left spinning (onnxruntime's default), they take the cores from the next model
    timed side by side, which made every interleaved timing 2-3x too slow on 2 cores."""
    pytest.importorskip("onnxruntime")
    from pipeline import onnxrt

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    sess = onnxrt.load(onnxrt.to_onnx(model, torch.zeros(1, 3, 8, 8)), threads=2)
    options = sess.get_session_options()
    assert options.get_session_config_entry("session.force_spinning_stop") == "1"
    assert options.intra_op_num_threads == 2
