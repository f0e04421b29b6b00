"""quantize: static int8 quantization of an earlier stage's network, verified before its
artifact is written.

`method: ptq` calibrates activation ranges on a fixed draw of training (or validation)
images and converts; `method: qat` first trains with fake-quantized convolutions and linear
layers through the shared Trainer (every training key of a finetune applies: schedule,
precision, DDP, resume, `distill` from the dense model), then converts with the input
ranges the fake-quantized layers learned (the other tensors calibrated as in ptq). The
backends (`pipeline.quantize`): onnxruntime (QDQ ONNX, the default) and pt2e (torch.export
with the x86 quantizer).

The int8 model is checked against the fp32 model it was made from on up to
`verify.images` test images: top-1 agreement >= `verify.min_agreement` and int8 top-1 no more
than `verify.max_top1_drop` points under the input stage's model on those images. A failed
check is a one-line error (exit 1) and writes no artifact. The stage writes
`model.int8.onnx` (or `model.int8.pt2`) and a summary with top-1/top-5 of the int8 model on
the test split (and the validation split), the artifact's size against its fp32 form, the
check, and the calibration; a QAT stage also writes `model.pt`, its trained fp32 weights.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from pipeline import checkpoint as ckpt
from pipeline import distributed as D
from pipeline.atomic import atomic_open
from pipeline.config import Invalid, Loader, opt, to_plain, yaml_key
from pipeline.data import DataConfig, build_data, input_size, normalization
from pipeline.data.config import val_count
from pipeline.data.sizes import train_size
from pipeline.errors import PipelineError, first_line
from pipeline.models import count_macs, count_params, model_from_payload
from pipeline.provenance import file_sha256
from pipeline.quantize import (
    BACKENDS,
    DEFAULT_BACKEND,
    QuantizeError,
    accuracy,
    agreement,
    attach_fake_quant,
    backend_of,
    calibrate_fake_quant,
    calibration_batches,
    check_calibration,
    learned_ranges,
    remove_fake_quant,
)
from pipeline.quantize import ort as ort_backend
from pipeline.rundir import MODEL_FILE, read_summary
from pipeline.trainer import TrainConfig

from . import training
from .base import Preflight, StageBase, StageContext
from .finetune import finetune_default_problem, lowest_lr_of
from .registry import register, upstream_training_stage
from .training import TrainingStage

log = logging.getLogger("pipeline")
ARTIFACT = "model"  # + the backend's suffix: model.int8.onnx, model.int8.pt2


def _finite(obj: Any, keys: list[str]) -> None:
    for k in keys:
        v = getattr(obj, k)
        if isinstance(v, float) and not math.isfinite(v):
            raise Invalid(k, f"expected a finite number, got {v}")


@dataclass
class CalibrationConfig:
    split: Literal["train", "val"] = opt(
        "train", "where the calibration images come from: train (the training split in the "
        "evaluation view: no crop, no flip; a seeded draw) or val (data.val_split, spread "
        "over the split)")
    batches: int = opt(16, "calibration batches", min=1, max=100000)
    batch_size: int = opt(32, "images per calibration batch", min=1, max=65536)


@dataclass
class VerifyConfig:
    images: int = opt(1000, "test images the int8 model is checked on (at most; a fixed, "
                      "class-balanced subset)", min=1, max=1000000)
    min_agreement: float = opt(0.97, "least share of those images whose int8 top-1 class is "
                               "the fp32 model's", min=0, max=1)
    max_top1_drop: float = opt(1.0, "most top-1 points the int8 model may lose against the "
                               "input stage's fp32 model on those images", min=0, max=100)

    def validate(self) -> None:
        _finite(self, ["min_agreement", "max_top1_drop"])


@dataclass
class Config(StageBase, TrainConfig):
    type: str = opt("quantize", "stage kind")
    method: Literal["ptq", "qat"] = opt(
        "ptq", "ptq: calibrate and convert; qat: train with fake quantization (the training "
        "keys of a finetune apply), then calibrate and convert")
    backend: Literal["onnxruntime", "pt2e"] = opt(
        DEFAULT_BACKEND, "onnxruntime: QDQ ONNX run by onnxruntime's CPU provider; pt2e: "
        "torch.export + the x86 quantizer (torchao), a .pt2 program")
    observer: Literal["minmax", "percentile", "entropy"] = opt(
        "minmax", "activation range: minmax (the calibration set's extremes), percentile "
        "(clip at `percentile`), entropy (onnxruntime: least KL divergence; pt2e: "
        "histogram search for the least L2 error)")
    percentile: float = opt(99.999, "observer percentile: the percentile kept", gt=50,
                            lt=100)
    reduce_range: bool | None = opt(
        None, "onnxruntime: 7-bit weights ([-64, 64]), which x86 CPUs without VNNI need "
        "(their u8s8 kernels add products in int16 and saturate on full-range weights); "
        "null: decided on the machine that quantizes (7 bits there without VNNI)")
    calibration: CalibrationConfig = opt(CalibrationConfig, "calibration set")
    verify: VerifyConfig = opt(VerifyConfig, "the check against fp32 before anything is "
                               "written")

    def validate(self) -> None:
        _finite(self, ["percentile"])
        if self.reduce_range and self.backend != "onnxruntime":
            raise Invalid("reduce_range", "applies to backend onnxruntime only")


TRAIN_KEYS = {yaml_key(f): f.name for f in dataclasses.fields(TrainConfig)}


@register
class Quantize(TrainingStage):
    """Convert the input model to int8 (after quantization-aware training with `qat`)."""

    kind = "quantize"
    Config = Config
    needs_input = True
    trains = False  # its output is an int8 artifact, never a schedule to continue

    def base_lr(self, spec: Config, name: str, run) -> float:
        if spec.lr is not None:
            return spec.resolved_lr(0.0)
        return lowest_lr_of(run, upstream_training_stage(run, name))

    def lr_source(self, spec: Config, name: str, run) -> str:
        if spec.lr is None:
            return f"lowest lr of '{upstream_training_stage(run, name)}'"
        return super().lr_source(spec, name, run)

    def check(self, spec: Config, name: str, run, loader: Loader) -> None:
        key = f"stages.{name}"
        if spec.method == "ptq":
            defaults = TrainConfig()
            for yk, field_name in TRAIN_KEYS.items():
                if getattr(spec, field_name) != getattr(defaults, field_name):
                    loader.fail(f"{key}.{yk}", "a training setting: only with method: qat")
        else:
            super().check(spec, name, run, loader)
            if spec.lr is None and (problem := finetune_default_problem(run, name)):
                loader.fail(f"{key}.lr", problem)
        _check_calibration_size(spec.calibration, run.data, f"{key}.calibration", loader)

    def preflight(self, spec: Config, name: str, pf: Preflight) -> tuple[nn.Module | None, dict]:
        """The backend's packages are there and the input stage writes a model; a QAT
        stage's output is its input's shape, a PTQ stage has no model.pt."""
        if spec.from_ not in pf.models:
            pf.fail(f"stages.{name}.from", f"stage {spec.from_!r} writes no model to quantize")
        try:
            backend_of(spec.backend).require()
        except PipelineError as err:
            pf.fail(f"stages.{name}.backend", first_line(err))
        if spec.method == "ptq":
            return None, {}
        return super().preflight(spec, name, pf)

    def plan_entry(self, spec: Config, name: str, run) -> dict:
        entry = super().plan_entry(spec, name, run) if spec.method == "qat" else {}
        c = spec.calibration
        entry["quantize"] = {
            "method": spec.method, "backend": spec.backend, "observer": spec.observer,
            "percentile": spec.percentile if spec.observer == "percentile" else None,
            "calibration": {"split": c.split, "batches": c.batches, "batch_size": c.batch_size,
                            "images": c.batches * c.batch_size},
            "verify": to_plain(spec.verify),
            "artifact": ARTIFACT + BACKENDS[spec.backend].suffix}
        return entry

    def plan_lines(self, entry: dict) -> list[str]:
        q = entry["quantize"]
        c, v = q["calibration"], q["verify"]
        obs = q["observer"] + (f" {q['percentile']:g}%" if q["percentile"] else "")
        lines = [f"    int8 {q['method']} with {q['backend']} -> {q['artifact']}; observer "
                 f"{obs}; calibration {c['batches']} x {c['batch_size']} {c['split']} images",
                 f"    verify on up to {v['images']} test images: top-1 agreement >= "
                 f"{v['min_agreement']:g}, top-1 drop <= {v['max_top1_drop']:g} points"]
        return lines + (super().plan_lines(entry) if "epochs" in entry else [])

    def run(self, spec: Config, ctx: StageContext) -> dict:
        return _run(self, spec, ctx)


def reduce_range_of(spec: Config) -> bool:
    """The 7-bit weight decision: as configured, else (onnxruntime) on this CPU."""
    if spec.backend != "onnxruntime":
        return False
    if spec.reduce_range is not None:
        return spec.reduce_range
    return not ort_backend.has_int8_dot()


def _check_calibration_size(c: CalibrationConfig, data: DataConfig, key: str,
                            loader: Loader) -> None:
    """The split holds the images asked for (counted as the loaders count them)."""
    n_train, _ = train_size(data)
    if c.split == "val":
        if data.val_split is None:
            loader.fail(f"{key}.split", "val needs data.val_split (no validation split held out)")
        full, _ = train_size(dataclasses.replace(data, val_split=None, train_samples=None))
        have = val_count(data, full)
    else:
        have = n_train
    want = c.batches * c.batch_size
    if want > have:
        loader.fail(key, f"{c.batches} batches of {c.batch_size} = {want} images, the {c.split} "
                    f"split holds {have}")


def _run(stage: Quantize, spec: Config, ctx: StageContext) -> dict:
    backend = backend_of(spec.backend)
    backend.require()
    model, payload = ctx.load_input(spec.from_)
    key = f"stages.{ctx.name}.calibration"
    c = spec.calibration
    batches = calibration_batches(ctx.run.data, c.split, c.batches, c.batch_size, ctx.run.seed,
                                  key)
    check_calibration(batches, ctx.input_size, key)
    trained: dict = {}
    fp32, source, imitated = model, None, None
    if spec.method == "qat":
        source = copy.deepcopy(model).eval()  # the accuracy the check holds the int8 model to
        fp32, trained, imitated = _qat(stage, spec, ctx, model, payload, batches)
    evals = _eval_data(ctx, spec)
    result = None
    with D.together():  # rank 0 converts, checks and writes; the others wait
        if ctx.dist.is_main:
            result = _convert(spec, ctx, backend, fp32.cpu().eval(), source, payload, batches,
                              evals, imitated)
    result = D.broadcast_object(result)
    macs = count_macs(fp32, ctx.input_size)
    return {**trained, **result, "params": count_params(fp32), "macs": macs["total"],
            "conv_macs": macs["conv"]}


def _qat(stage: Quantize, spec: Config, ctx: StageContext, model: nn.Module, payload: dict,
         batches: list[torch.Tensor]) -> tuple[nn.Module, dict, nn.Module]:
    """Train `model` fake-quantized (ranges started from the calibration set); model.pt
    gets the trained weights without the observers. Returns them, the training summary and
    the trained fake-quantized network (on the CPU, in eval mode: the computation the int8
    model imitates, which the check's agreement is measured against)."""
    wmax = 64 if reduce_range_of(spec) else 127
    names = attach_fake_quant(model, wmax=wmax)
    calibrate_fake_quant(model, batches)
    log.info("stage %s: %d layers fake-quantized for QAT", ctx.name, len(names))
    lr = stage.base_lr(spec, ctx.name, ctx.run)
    result = training.train(ctx, spec, model, payload["arch"], lr, meta={"qat": True})
    path = ctx.stage_dir / MODEL_FILE
    plain = model_from_payload(payload, str(ctx.input_path(spec.from_)))
    attach_fake_quant(plain, wmax=wmax)
    plain.load_state_dict(ckpt.load(path)["state_dict"], strict=True)
    imitated = copy.deepcopy(plain).cpu().eval()
    remove_fake_quant(plain)
    with D.together():
        if ctx.dist.is_main:
            ckpt.save_model(path, plain, payload["arch"], {"stage": ctx.name, "qat": True})
    keep = ("epochs", "best_top1", "best_epoch", "best_split", "global_steps", "images_per_s",
            "train_seconds", "lr", "batch_size", "steps_per_epoch", "channels_last",
            "precision_decision", "skipped_steps")
    out = {k: result[k] for k in keep if k in result}
    out["train_precision"] = result.get("precision")  # "precision" is the artifact's: int8
    out["fake_quant_top1"] = result.get("top1")
    return plain, out, imitated


@dataclass
class _Evals:
    verify: list[tuple[torch.Tensor, torch.Tensor]]
    test: Any
    val: Any


def _eval_data(ctx: StageContext, spec: Config) -> _Evals:
    """The check's test images (a class-balanced subset) and the full test/val loaders,
    built on every rank (building data is collective under torchrun), used on rank 0."""
    data = ctx.run.data
    n = min(data.test_samples or spec.verify.images, spec.verify.images)
    small = dataclasses.replace(data, test_samples=n, num_workers=0, persistent_workers=False)
    cpu = torch.device("cpu")
    sub = build_data(small, 256, 256, ctx.run.seed, cpu)
    full = build_data(data, 256, 256, ctx.run.seed, cpu)
    return _Evals([(x, y) for x, y in sub.test], full.test, full.val)


def _convert(spec: Config, ctx: StageContext, backend, fp32: nn.Module,
             source: nn.Module | None, payload: dict, batches: list[torch.Tensor],
             evals: _Evals, imitated: nn.Module | None = None) -> dict:
    """Quantize, check, evaluate and write the artifact (rank 0). `source`: the input
    stage's fp32 model when it is not `fp32` itself (after QAT); `imitated`: the model the
    int8 one must agree with when it is not `fp32` (after QAT: the fake-quantized one)."""
    t0 = time.perf_counter()
    work = ctx.stage_dir / ".quantize_tmp"
    work.mkdir(parents=True, exist_ok=True)
    meta = _metadata(spec, ctx, payload)
    reduce = reduce_range_of(spec)
    # after QAT, each Conv2d/Linear input keeps the range it trained with; the other
    # tensors (residual sums, pooling) are calibrated
    ranges = learned_ranges(imitated) if imitated is not None else None
    try:
        data = backend.quantize(copy.deepcopy(fp32), batches, spec.observer, spec.percentile,
                                meta, work, reduce_range=reduce, ranges=ranges)
        fp32_bytes = _fp32_bytes(backend, fp32, batches, work)
        run = backend.runner(data)
    except PipelineError:
        raise
    except Exception as err:  # the backend's own failure, in one line
        raise QuantizeError(f"stage {ctx.name}: {spec.backend} quantization failed: "
                            f"{first_line(err)}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
    seconds = time.perf_counter() - t0
    check = _check(spec, ctx, fp32 if imitated is None else imitated, source, run, evals,
                   "fp32" if imitated is None else "fake-quantized QAT")
    out = ctx.stage_dir / (ARTIFACT + backend.suffix)
    with atomic_open(out, "wb") as f:
        f.write(data)
    test = accuracy(run, evals.test)
    val = accuracy(run, evals.val) if evals.val is not None else None
    src = read_summary(ctx.run_dir / spec.from_) or {}
    return {"top1": test["top1"], "top5": test["top5"],
            **({"val_top1": val["top1"], "val_top5": val["top5"]} if val else {}),
            "precision": "int8", "method": spec.method, "backend": spec.backend,
            "runtime": backend.runtime, "observer": spec.observer, "reduce_range": reduce,
            "percentile": spec.percentile if spec.observer == "percentile" else None,
            "calibration": {**to_plain(spec.calibration), "images": sum(map(len, batches))},
            "learned_ranges": meta.get("learned_ranges") if ranges is not None else None,
            "artifact": out.name, "artifact_bytes": out.stat().st_size,
            "artifact_sha256": file_sha256(out), "fp32_bytes": fp32_bytes,
            "size_ratio": round(fp32_bytes / out.stat().st_size, 4),
            "verification": check, "quantize_seconds": round(seconds, 3),
            "source": spec.from_, "source_top1": src.get("top1"),
            "source_val_top1": src.get("val_top1")}


def _check(spec: Config, ctx: StageContext, imitated: nn.Module, source: nn.Module | None,
           run, evals: _Evals, against: str = "fp32") -> dict:
    """The verification: QuantizeError (exit 1, nothing written) when it fails. The
    agreement is with `imitated` (named `against`), the top-1 drop against `source` (the
    input stage's model; `imitated` when None)."""
    v = spec.verify
    a = agreement(imitated, run, evals.verify)
    ref = a if source is None else agreement(source, run, evals.verify)
    drop = ref.fp32_top1 - a.int8_top1
    log.info("stage %s: %s", ctx.name, a.line(against))
    problems = []
    if a.rate < v.min_agreement:
        problems.append(f"top-1 agreement with the {against} model {100 * a.rate:.2f}% "
                        f"< verify.min_agreement "
                        f"{100 * v.min_agreement:g}%")
    if drop > v.max_top1_drop:
        problems.append(f"top-1 {a.int8_top1:.2f}% is {drop:.2f} points under the input's "
                        f"{ref.fp32_top1:.2f}% (verify.max_top1_drop {v.max_top1_drop:g})")
    if problems:
        raise QuantizeError(f"stage {ctx.name}: int8 check failed on {a.images} test images, "
                            f"nothing written: {'; '.join(problems)}")
    return {**a.as_dict(), "agreement_with": against,
            "input_top1": round(ref.fp32_top1, 4), "top1_drop": round(drop, 4),
            "min_agreement": v.min_agreement, "max_top1_drop": v.max_top1_drop,
            "passed": True}


def _fp32_bytes(backend, fp32: nn.Module, batches: list[torch.Tensor], work) -> int:
    """The size of the fp32 model in the artifact's format (what the int8 file shrinks)."""
    return len(backend.fp32_artifact(copy.deepcopy(fp32), batches[0][:2], work))


def _metadata(spec: Config, ctx: StageContext, payload: dict) -> dict:
    """The provenance and input contract the artifact carries."""
    mean, std = normalization(ctx.run.data)
    return {"run": ctx.run_dir.name, "stage": ctx.name, "source_stage": spec.from_,
            "source_sha256": file_sha256(ctx.input_path(spec.from_)),
            "model": payload["arch"].get("name"), "arch": payload["arch"],
            "precision": "int8", "method": spec.method, "backend": spec.backend,
            "observer": spec.observer, "reduce_range": reduce_range_of(spec),
            "input_name": "input", "output_name": "logits",
            "input_size": list(input_size(ctx.run.data)), "mean": list(mean), "std": list(std),
            "num_classes": int(payload["arch"]["num_classes"]), "torch": torch.__version__,
            "quantized": time.strftime("%Y-%m-%dT%H:%M:%S")}


__all__ = ["Config", "CalibrationConfig", "VerifyConfig", "Quantize", "ARTIFACT"]
