"""prune: remove whole filters from the input model by FPGM / L1 / L2 / random / Taylor /
BN scale (network slimming) / DepGraph group norm, and (`heads`) whole attention heads.

Writes model.pt (the pruned network as data: its state dict's shapes are the widths;
`pipeline.load_model(path)` rebuilds it), `layers.json` (per pruned group: name, layer
number, the coupled convs, widths before and after, the removed filter indices in the
dense numbering; per attention module that lost heads an entry with "kind": "heads")
and a summary with params, MACs before and after, and the pruned
model's accuracy before any recovery (`top1`, `top5`, `test_loss`).

With `target_speedup` or `target_latency_ms` (and `latency`: the runtime) the widths come
from a latency table measured in that runtime and the pruned model is timed against the
dense one end to end (`latency.json`; `stages.latency`, `pipeline.pruning.latency`).

After soft pruning (`prune_during_training` of the input stage) this stage is where
the filters are removed: it removes exactly the filters soft pruning zeroed after the
last epoch (recorded in the input's model.pt), so its selection keys must be left out
or equal those of `prune_during_training` (`use_soft_mask: false` selects anew).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Literal

import torch

from pipeline import checkpoint as ckpt
from pipeline import distributed as D
from pipeline.atomic import atomic_write_text
from pipeline.attention import remove_heads
from pipeline.config import MAX_BATCH, Invalid, Loader, opt, to_plain
from pipeline.data import build_data
from pipeline.models import count_macs, count_params
from pipeline.precision import eval_precision
from pipeline.pruning import (
    CRITERIA,
    SELECTION_KEYS,
    LayerRefError,
    PruneSpec,
    PruningError,
    prune_model,
    remove_filters,
)
from pipeline.pruning.latency.config import LatencyTargetKeys, validate_target
from pipeline.pruning.surgery import PruneReport, output_shape
from pipeline.rundir import MODEL_FILE
from pipeline.runspec import RunConfig
from pipeline.trainer import evaluate_splits

from . import latency
from .base import Preflight, Stage, StageBase, StageContext, tensor_core_round_to
from .registry import register
from .sensitivity import check_layer_ratios_from, read_suggested, with_suggested

log = logging.getLogger("pipeline")


@dataclass
class Config(StageBase, LatencyTargetKeys, PruneSpec):
    type: str = opt("prune", "stage kind")
    round_to: int | Literal["auto"] | None = opt(  # type: ignore[assignment]
        None, "torch-pruning's rounding instead of floor(ratio x filters): keep int(filters x "
        "(1 - ratio)) rounded down to a multiple of this; unset: 8 on CUDA when the run "
        "computes in fp16/bf16 (tensor cores), else none; 0: none; auto: the alignment "
        "measured in the `latency` runtime (where its layers' time drops)", min=0)
    evaluate: bool = opt(True, "measure the pruned model's accuracy before recovery")
    eval_batch_size: int = opt(256, "batch size of that evaluation", min=1, limit=MAX_BATCH)
    batch_size: int = opt(128, "taylor: size of the training batches the gradients are "
                          "taken on (the run's training data, its augmentation included)",
                          min=1, limit=MAX_BATCH)
    layer_ratios_from: str | None = opt(
        None, "an earlier sensitivity stage: prune with its suggested.yaml's layer_ratios "
        "(only those layers) and skip")
    use_soft_mask: bool | None = opt(
        None, "remove exactly the filters the input stage's prune_during_training zeroed "
        "(default: when the input has them); false: select anew with this stage's keys")

    def validate(self) -> None:
        validate_target(self.target_speedup, self.target_latency_ms, {
            "ratio": self.ratio, "target_macs_reduction": self.target_macs_reduction,
            "layer_ratios": self.layer_ratios, "layer_ratios_from": self.layer_ratios_from,
            "global_ranking": self.global_ranking, "heads": self.heads,
            "fpgm.norm_ratio": self.fpgm.norm_ratio or None,
            "fpgm.distance_ratio": self.fpgm.distance_ratio})
        if self.round_to == "auto" and self.round_mode != "down" and self.has_latency_target:
            raise Invalid("round_mode", "a latency target snaps to the measured stairs: leave "
                          "round_mode unset")
        PruneSpec.validate(self)
        if self.has_latency_target:
            self.ratio = None  # the search decides the widths


@register
class Prune(Stage):
    """Remove whole filters from the input model."""

    kind = "prune"
    Config = Config
    needs_input = True
    prunes = True

    def check(self, spec: Config, name: str, run: RunConfig, loader: Loader) -> None:
        _check_soft(spec, name, run, loader)
        check_layer_ratios_from(spec, name, run, loader)

    def plan_entry(self, spec: Config, name: str, run: RunConfig) -> dict:
        entry = dict(method=spec.method, ratio=spec.ratio, heads=spec.heads, policy=spec.policy,
                     round_to=spec.round_to, round_mode=spec.round_mode,
                     target_macs_reduction=spec.target_macs_reduction,
                     layer_ratios_from=spec.layer_ratios_from)
        entry["global_ranking"] = spec.global_ranking
        if latency.measured(spec):
            entry.update(target_speedup=spec.target_speedup,
                         target_latency_ms=spec.target_latency_ms,
                         latency=to_plain(spec.latency_config()))
        if CRITERIA[spec.method].needs_gradients:
            entry["batches"], entry["batch_size"] = spec.batches, spec.batch_size
        if spec.method == "fpgm" and (spec.fpgm.norm_ratio or spec.fpgm.distance_ratio):
            entry["fpgm"] = {"norm_ratio": spec.fpgm.norm_ratio,
                             "distance_ratio": spec.fpgm.distance_ratio}
        return entry

    def plan_lines(self, entry: dict) -> list[str]:
        what = (f"ratio {entry['ratio']}" if entry.get("ratio") is not None
                else f"target MAC reduction {entry['target_macs_reduction']}"
                if entry.get("target_macs_reduction") is not None else
                "widths from the latency table" if entry.get("latency") else "")
        if entry.get("heads") is not None:
            what = ", ".join([f"heads {entry['heads']} of every attention module",
                              what or "no filters"])
        if entry.get("round_to") == "auto":
            what += ", kept filters rounded to the alignment measured in the runtime"
        elif entry.get("round_to"):
            what += (f", kept filters rounded {entry['round_mode']} to a multiple of "
                     f"{entry['round_to']}")
        if entry.get("global_ranking"):
            what += ", one global ranking"
        if entry.get("batches"):
            what += (f", gradients of {entry['batches']} training batches of "
                     f"{entry['batch_size']}")
        if entry.get("layer_ratios_from"):
            what = f"per-layer ratios from stage '{entry['layer_ratios_from']}' (suggested.yaml)"
        lines = [f"    {entry['method']} {what}, policy {entry['policy']}"]
        tc = entry.get("tensor_core_rounding")
        if tc:
            widths = ", ".join(f"{g} {a} -> {b}" for g, (a, b) in tc["changed"].items())
            lines.append(f"    kept filters rounded down to a multiple of {tc['round_to']} "
                         f"(default on CUDA with fp16/bf16); widths changed: "
                         f"{widths or 'none'}")
        lines += latency.plan_lines(entry)
        p = entry.get("predicted")
        if p:
            lines.append(
                f"    predicted: MACs {_human(p['macs_before'])} -> {_human(p['macs'])} "
                f"({100 * p['mac_reduction']:.1f}% fewer), params {_human(p['params_before'])}"
                f" -> {_human(p['params'])} ({100 * p['param_reduction']:.1f}% fewer), "
                f"{p['pruned_layers']} pruned group(s)"
                + (f", {p['heads']} of {p['heads_before']} attention heads kept"
                   if p.get("heads_before") else "")
                + ("" if p["exact"] else " (estimate: global ranking depends on the weights)"))
        return lines

    def preflight(self, spec: Config, name: str, pf: Preflight):
        """Prune a copy of the input model as this stage will: resolves every layer
        reference, the policy and the MAC target, and predicts the widths, MACs and
        params (exact unless global_ranking, whose split across groups depends on the
        weights; the criterion itself does not change the widths, so the cheap L1 one
        stands in for the others)."""
        if spec.layer_ratios_from:  # a malformed suggested.yaml already there fails now
            read_suggested(pf.run.run_dir / spec.layer_ratios_from)
        model = pf.input_model(spec, copied=True)
        use, where = spec, f"stages.{name}"
        up = pf.run.stages.get(spec.from_)
        soft = getattr(up, "prune_during_training", None)
        if soft is not None and spec.use_soft_mask is not False:
            use, where = soft, f"stages.{spec.from_}.prune_during_training"
        if not use.global_ranking and not use.fpgm.is_mix:
            use = dataclasses.replace(use, method="l1")
        aligned = use is not soft and use.round_to is None and tensor_core_round_to(
            None, pf.run, pf.cuda)
        if aligned:
            use = dataclasses.replace(use, round_to=aligned)
        size = pf.input_size
        unaligned = copy.deepcopy(model) if aligned else None
        measuring = use is not soft and latency.measured(spec)
        lat: dict = {}
        if measuring:  # the runtime must be there; a dry run measures the prediction
            latency.check_backend(spec, name, pf)
            lat = {"measured": True}
            if not pf.need_files:
                pruned, lat = latency.predict(spec, name, pf, pf.input_model(spec, copied=True))
                if spec.has_latency_target:
                    model = pruned
            use = dataclasses.replace(
                use, target_speedup=None, target_latency_ms=None,
                ratio=0.1 if spec.has_latency_target else use.ratio,
                round_to=(lat.get("predicted_latency") or {}).get("alignment")
                if spec.round_to == "auto" else use.round_to)
        # the widths do not depend on the image size: a one-shot pruning traces the model
        # on small images; the MAC target measures at the real size; MACs are counted on a
        # copy on the meta device (shapes only, no arithmetic)
        before_macs, before_params = _meta_macs(model, size), count_params(model)
        checked_model = pf.input_model(spec, copied=True) if spec.has_latency_target else model
        try:
            report = _prune_small(checked_model, use, size, pf.run.seed)
        except LayerRefError as err:
            pf.fail(f"{where}.{err.key}", f"{err.bare} "
                    f"({err.hint.replace('the model', pf.arch_label, 1)}; see --dry-run)")
        except PruningError as err:
            pf.fail(f"{where}.{err.key}" if err.key else where, f"{err.problem} (on "
                    f"{pf.arch_label}; see --dry-run)")
        if measuring and spec.has_latency_target:
            return model, {**lat, **self._latency_prediction(model, size, before_macs,
                                                              before_params, lat)}
        macs, params = _meta_macs(model, size), count_params(model)
        extra = {} if unaligned is None else {"tensor_core_rounding": _rounding_note(
            unaligned, dataclasses.replace(use, round_to=0), report, size, pf, aligned)}
        return model, {**extra, **lat, "predicted": {
            "macs_before": before_macs, "macs": macs, "mac_reduction": 1 - macs / before_macs,
            "params_before": before_params, "params": params,
            "param_reduction": 1 - params / before_params,
            "pruned_layers": len(report.layers), "steps": report.steps,
            "widths": {e["name"]: e["after"] for e in report.layers},
            **_head_counts(report),
            "exact": not use.global_ranking and not (measuring and pf.need_files)}}

    @staticmethod
    def _latency_prediction(model, size, before_macs: int, before_params: int,
                            lat: dict) -> dict:
        """The MACs and params of the widths a latency target's search predicts (a dry
        run), or nothing before the stage measures (a run's preflight)."""
        p = lat.get("predicted_latency")
        if not p:
            return {}
        macs, params = _meta_macs(model, size), count_params(model)
        dense = p.get("dense_widths", {})
        return {"predicted": {
            "macs_before": before_macs, "macs": macs, "mac_reduction": 1 - macs / before_macs,
            "params_before": before_params, "params": params,
            "param_reduction": 1 - params / before_params,
            "pruned_layers": sum(w < dense.get(n, w + 1) for n, w in p["widths"].items()),
            "steps": 1, "widths": p["widths"], "exact": False}}

    def run(self, spec: Config, ctx: StageContext) -> dict:
        return _run(spec, ctx)


def _rounding_note(model: torch.nn.Module, unrounded: PruneSpec, report, size, pf: Preflight,
                   round_to: int) -> dict:
    """What the default tensor-core rounding changes: the widths without it and with it,
    for the groups where they differ."""
    plain = _prune_small(model, unrounded, size, pf.run.seed)
    before = {e["name"]: e["after"] for e in plain.layers}
    changed = {e["name"]: [before.get(e["name"]), e["after"]] for e in report.layers
               if before.get(e["name"]) != e["after"]}
    return {"round_to": round_to, "why": "CUDA with fp16/bf16: tensor cores want channel "
            "counts in multiples of 8 (set round_to to override, 0 for none)",
            "changed": changed}


def _head_counts(report) -> dict:
    """The attention heads before and after (empty when no head was removed)."""
    if not report.heads:
        return {}
    return {"heads_before": sum(e["before"] for e in report.heads),
            "heads": sum(e["after"] for e in report.heads)}


def _runs_on(model: torch.nn.Module, x: torch.Tensor) -> bool:
    """Whether `model` takes input `x` (a ViT takes its one image size only)."""
    try:
        output_shape(model, x)
    except Exception:  # noqa: BLE001 -- any failure means: trace at the real size
        return False
    return True


def _prune_small(model: torch.nn.Module, spec: PruneSpec, size, seed: int):
    """Prune `model` in place as `spec` says, traced on 32x32 images (the widths do not
    depend on the image size, and the MAC target counts the MACs of the real size; an
    ImageNet network traces ~50x faster), or on images of the real size for a network
    that cannot run on small ones."""
    if max(size[1:]) > 32 and _runs_on(model, torch.zeros((1, size[0], 32, 32))):
        params = count_params(model)
        try:
            return prune_model(model, spec, torch.zeros((1, size[0], 32, 32)), seed=seed,
                               mac_size=tuple(size))
        except PruningError as err:
            if err.key is not None or count_params(model) != params:
                raise  # a spec error, or it failed after changing the model
    return prune_model(model, spec, torch.zeros((1, *size)), seed=seed)


def _meta_macs(model: torch.nn.Module, size) -> int:
    """MACs (conv + linear) of `model` at input `size`, counted on a meta-device copy (its
    tensors made directly on the meta device: nothing is copied)."""
    memo: dict = {id(p): torch.nn.Parameter(p.to("meta"), p.requires_grad)
                  for p in model.parameters()}
    memo.update({id(b): b.to("meta") for b in model.buffers()})
    return count_macs(copy.deepcopy(model, memo), size)["total"]


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:g}"


def _check_soft(spec: Config, name: str, run: RunConfig, loader: Loader) -> None:
    """Coherence with soft pruning upstream (see the module docstring)."""
    up = run.stages.get(spec.from_) if spec.from_ else None
    soft = getattr(up, "prune_during_training", None)
    if spec.use_soft_mask and soft is None:
        loader.fail(f"stages.{name}.use_soft_mask", f"stage {spec.from_!r} does no soft "
                    "pruning (set its prune_during_training)")
    if soft is None or spec.use_soft_mask is False:
        return
    if latency.measured(spec):
        key = "round_to" if not spec.has_latency_target else (
            "target_speedup" if spec.target_speedup is not None else "target_latency_ms")
        loader.fail(f"stages.{name}.{key}", f"after soft pruning (stages.{spec.from_}."
                    "prune_during_training) this stage removes the filters soft pruning "
                    "zeroed; a measured target needs use_soft_mask: false")
    defaults = Config(type="prune")
    defaults.validate()
    for key in (*SELECTION_KEYS, "target_macs_reduction"):
        mine, theirs = getattr(spec, key), getattr(soft, key)
        if mine != theirs and mine != getattr(defaults, key):
            loader.fail(f"stages.{name}.{key}",
                        f"{mine!r} differs from stages.{spec.from_}.prune_during_training."
                        f"{key} {theirs!r}; after soft pruning this stage removes the filters "
                        "soft pruning zeroed (leave the key out, or set use_soft_mask: false)")


def _training_batches(spec: Config, ctx: StageContext):
    """The run's training batches for gradient-based criteria (one unsplit loader, epoch
    0; rank 0 takes the gradients and selects)."""
    data = build_data(ctx.run.data, spec.batch_size, spec.eval_batch_size, ctx.run.seed,
                      ctx.device)
    data.train.set_epoch(0)
    return data.train


def _select_on_rank0(ctx: StageContext, spec: Config, pspec: PruneSpec,
                     model: torch.nn.Module, example: torch.Tensor, seed: int):
    """Prune `model` in place as `pspec` says: rank 0 selects (a gradient-based criterion
    such as taylor can score differently on another rank: cuDNN autotuning picks other
    kernels) and every other rank removes exactly rank 0's filters and heads."""
    report = None
    gradients = CRITERIA[spec.method].needs_gradients
    train = _training_batches(spec, ctx) if gradients else None  # built by every rank
    with D.together():  # a failure on rank 0 stops every rank
        if ctx.dist.is_main:
            if gradients:
                model.to(ctx.device)
                report = prune_model(model, pspec, example.to(ctx.device), seed=seed,
                                     batches=lambda: train.iterate(0))
                model.cpu()
            else:
                report = prune_model(model, pspec, example, seed=seed)
    chosen = D.broadcast_object(
        (report.layers, report.heads, report.steps) if report is not None else None)
    if report is None:
        layers, heads, steps = chosen
        mods = dict(model.named_modules())
        for entry in heads:  # heads first, as rank 0 pruned them
            remove_heads(mods[entry["name"]], list(entry["removed"]))
        report = remove_filters(model, layers, example) if layers else PruneReport()
        report.heads, report.steps = heads, steps
    return report


def _measured_prune(spec: Config, pspec: PruneSpec, model: torch.nn.Module,
                    ctx: StageContext, seed: int):
    """A latency target (widths from the measured table, checked end to end) or round_to:
    auto (the measured alignment, then the usual pruning, timed end to end)."""
    batches = None
    if CRITERIA[spec.method].needs_gradients:
        train = _training_batches(spec, ctx)
        batches = lambda: train.iterate(0)  # noqa: E731
    if spec.has_latency_target:
        return latency.prune(spec, model, ctx, seed, batches)
    round_to, record = latency.aligned_round_to(spec, model, ctx)
    dense = copy.deepcopy(model)
    report = prune_model(model, dataclasses.replace(pspec, round_to=round_to),
                         torch.zeros((1, *ctx.input_size)), seed=seed, batches=batches)
    if ctx.dist.is_main:
        latency.measure_pair(spec, dense, model, ctx.input_size, record)
    return model, report, record


def _run(spec: Config, ctx: StageContext) -> dict:
    t0 = time.perf_counter()
    model, payload = ctx.load_input(spec.from_)
    arch = payload["arch"]
    size = ctx.input_size
    before_macs = count_macs(model, size)
    before_params = count_params(model)
    example = torch.zeros((1, *size))
    seed = ctx.run.seed if spec.seed is None else spec.seed
    soft = (payload.get("meta") or {}).get("soft_pruning")
    lat_record = None
    if spec.use_soft_mask and not soft:
        raise PruningError(f"stage '{ctx.name}': use_soft_mask is set but the input model "
                           f"({ctx.input_path(spec.from_)}) carries no soft-pruning record")
    t1 = time.perf_counter()
    aligned = None
    # the soft record is in the model file every rank loaded; a selection is rank 0's
    if soft and spec.use_soft_mask is not False:
        report = remove_filters(model, soft["record"], example)
        how = soft.get("spec", {})
        selection = f"soft pruning of stage '{spec.from_}'"
        method, ratio, policy = how.get("method"), how.get("ratio"), how.get("policy")
    else:
        pspec = with_suggested(spec, ctx)
        aligned = pspec.round_to is None and tensor_core_round_to(
            None, ctx.run, ctx.device.type == "cuda")
        if aligned:
            pspec = dataclasses.replace(pspec, round_to=aligned)
            log.info("prune: kept filters rounded down to a multiple of %d (default on CUDA "
                     "with fp16/bf16; set round_to to override)", aligned)
        if latency.measured(spec):
            model, report, lat_record = _measured_prune(spec, pspec, model, ctx, seed)
        else:
            report = _select_on_rank0(ctx, spec, pspec, model, example, seed)
        selection = "criterion"
        method, ratio, policy = spec.method, spec.ratio, spec.policy
    prune_seconds = time.perf_counter() - t1
    after_macs = count_macs(model, size)
    summary = {
        "params_before": before_params, "params": count_params(model),
        "macs_before": before_macs["total"], "macs": after_macs["total"],
        "conv_macs_before": before_macs["conv"], "conv_macs": after_macs["conv"],
        "mac_reduction": 1 - after_macs["total"] / before_macs["total"],
        "conv_mac_reduction": 1 - after_macs["conv"] / before_macs["conv"],
        "mac_ratio": before_macs["total"] / max(after_macs["total"], 1),
        "method": method, "ratio": ratio, "policy": policy, "selection": selection,
        "target_macs_reduction": spec.target_macs_reduction, "steps": report.steps,
        **({"round_to": aligned, "round_to_source": "tensor cores (CUDA, fp16/bf16)"}
           if aligned else {}),
        "pruned_layers": len(report.layers), "epochs": 0, "heads": spec.heads,
        **_head_counts(report),
    }
    if lat_record is not None:
        latency.write_record(ctx, lat_record)
        summary.update(latency.summary_fields(lat_record))
        latency.report_miss(ctx.name, lat_record)
    if spec.evaluate:
        data = build_data(ctx.run.data, spec.eval_batch_size, spec.eval_batch_size, ctx.run.seed,
                          ctx.device, ctx.dist.rank, ctx.dist.world_size)
        metrics = evaluate_splits(model.to(ctx.device), data, ctx.device,
                                  eval_precision(ctx.run.precision, ctx.device))
        summary.update(metrics)
        model.cpu()
    meta = {"stage": ctx.name, "method": method, "ratio": ratio, "policy": policy,
            "selection": selection, "macs_before": before_macs["total"],
            "layers": report.layers, "heads": report.heads}
    with D.together():  # rank 0 writes; a failure there stops every rank
        if ctx.dist.is_main:
            ctx.stage_dir.mkdir(parents=True, exist_ok=True)
            ckpt.save_model(ctx.stage_dir / MODEL_FILE, model, arch, meta)
            atomic_write_text(ctx.stage_dir / "layers.json",
                              json.dumps(report.layers + report.heads, indent=1))
    log.info("pruned %d group(s), %d attention head(s): MACs %.4g -> %.4g (%.1f%% fewer), "
             "params %d -> %d",
             len(report.layers), sum(len(e["removed"]) for e in report.heads),
             before_macs["total"], after_macs["total"],
             100 * summary["mac_reduction"], before_params, summary["params"])
    summary["prune_seconds"] = prune_seconds
    summary["stage_seconds"] = time.perf_counter() - t0
    return summary
