"""Provenance: what each run directory records, and stale results said out loud."""

from __future__ import annotations

import json
import platform
import re

import torch
import yaml

from pipeline import provenance as P


def summary(run_dir, stage) -> dict:
    return json.loads((run_dir / stage / "summary.json").read_text())


def rewrite(run_dir, stage, **changes) -> None:
    s = summary(run_dir, stage)
    for key, value in changes.items():
        if isinstance(value, dict):
            s[key] = {**(s.get(key) or {}), **value}
        else:
            s[key] = value
    (run_dir / stage / "summary.json").write_text(json.dumps(s))


QUICK = {"stages": {"pretrain": {"epochs": 1, "schedule": {"milestones": []}}}}


def test_run_records_provenance_and_flags_stale_stages(tiny_config, cli, tmp_path,
                                                       monkeypatch):
    cfg = tiny_config(QUICK)
    code, _, err = cli("run", cfg)
    assert code == 0, err
    run_dir = tmp_path / "runs" / "tiny"

    info = json.loads((run_dir / "provenance.json").read_text())
    assert info["reproduce"] == f"python -m pipeline run {cfg}"
    assert info["command"]  # the process's own command line
    assert re.fullmatch(r"[0-9a-f]{40}", info["git_commit"])
    assert isinstance(info["git_dirty"], bool)
    assert info["python"] == platform.python_version()
    assert info["torch"] == torch.__version__
    for key in ("torchvision", "torch_pruning"):
        assert info[key]
    assert (info["device"], info["seed"], info["world_size"]) == ("cpu", 0, 1)
    # the hash is that of the resolved config written next to it
    written = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert info["config_hash"] == P.config_hash(written)
    assert len((run_dir / "provenance.log.jsonl").read_text().splitlines()) == 1

    # every completed stage records its code, its model's hash and the input it consumed
    for stage, upstream in (("pretrain", None), ("prune", "pretrain"), ("finetune", "prune")):
        s = summary(run_dir, stage)
        assert s["code"]["code_id"] and s["code"]["git_commit"] == info["git_commit"]
        assert s["model_sha256"] == P.file_sha256(run_dir / stage / "model.pt")
        if upstream is None:
            assert s["input"] is None
        else:
            up = summary(run_dir, upstream)
            assert s["input"] == {"stage": upstream, "finished": up["finished"],
                                  "model_sha256": up["model_sha256"]}

    # from here on the code is the code of the first run (other edits to this working tree
    # while the test runs must not count as code changes)
    first = dict(summary(run_dir, "pretrain")["code"])
    monkeypatch.setattr(P, "code_version", lambda: dict(first))

    # re-running the prune stage gives the same model: finetune is still current
    code, _, err = cli("run", cfg, "--stage", "prune", "--restart")
    assert code == 0, err
    code, _, err = cli("run", cfg)
    assert code == 0 and "re-run after it" not in err
    assert "stage finetune: already completed (top-1" in err

    # an upstream re-run that changed the model: the downstream stage is reported stale
    rewrite(run_dir, "prune", model_sha256="0" * 16, finished="2999-01-01T00:00:00")
    code, _, err = cli("run", cfg)
    assert code == 0
    (line,) = [x for x in err.splitlines() if "stage finetune" in x]
    assert "already completed, but its input stage 'prune' was re-run after it" in line
    assert "--restart --stage finetune" in line
    code, out, _ = cli("compare", run_dir, "--format", "json")
    rows = {r["stage"]: r for r in json.loads(out)}
    assert "stale: its input stage 'prune' was re-run after it" in rows["finetune"]["note"]
    assert "note" not in rows["pretrain"]

    # a stage computed by other code says so
    rewrite(run_dir, "pretrain", code={"code_id": "feedfeedfeedfeed", "git_commit": "ab" * 20})
    code, _, err = cli("run", cfg)
    (line,) = [x for x in err.splitlines() if "stage pretrain" in x]
    assert "computed by other code (commit abababab" in line
    assert len((run_dir / "provenance.log.jsonl").read_text().splitlines()) == 5


def test_stale_reasons_fall_back_to_finish_times(tmp_path):
    (tmp_path / "prune").mkdir()
    (tmp_path / "prune" / "summary.json").write_text(json.dumps(
        {"status": "completed", "finished": "2026-01-02T00:00:00"}))
    used = {"input": {"stage": "prune", "finished": "2026-01-01T00:00:00"}}
    (reason,) = P.stale_reasons(used, tmp_path, code={})
    assert "'prune' was re-run after it" in reason
    same = {"input": {"stage": "prune", "finished": "2026-01-02T00:00:00"}}
    assert P.stale_reasons(same, tmp_path, code={}) == []
    (tmp_path / "prune" / "summary.json").write_text(json.dumps({"status": "failed"}))
    (reason,) = P.stale_reasons(same, tmp_path, code={})
    assert "no longer completed" in reason
    # summaries from before these records: nothing to say
    assert P.stale_reasons({}, tmp_path, code={"code_id": "x"}) == []


def test_code_identity_ignores_reporting_modules():
    v = P.code_version()
    assert set(v) == {"git_commit", "git_dirty", "code_id"}
    assert "pipeline/report" in P.NOT_RESULTS
    for path in ("pipeline/report/tables.py", "pipeline/report/__init__.py",
                 "pipeline/reference.py", "pipeline/provenance.py", "tests/test_report.py"):
        assert not P.is_result_code(path), path
    for path in ("pipeline/trainer.py", "stages/prune.py", "pipeline/reporting.py"):
        assert P.is_result_code(path), path
    now = {"code_id": "a", "git_commit": "c" * 40}
    assert P.stale_reasons({"code": {"code_id": "a", "git_commit": "d" * 40}}, ".", now) == []
    (reason,) = P.stale_reasons({"code": {"code_id": "b", "git_commit": "d" * 40,
                                          "git_dirty": True}}, ".", now)
    assert reason.startswith("computed by other code (commit dddddddddd with uncommitted")


def test_command_line_shows_the_module_form():
    argv = ["/x/pipeline/__main__.py", "run", "configs/a b.yaml", "--set", "seed=1"]
    assert P.command_line(argv) == "python -m pipeline run 'configs/a b.yaml' --set seed=1"
    assert P.reproduce_command("c.yaml", ["a.b=1"]) == "python -m pipeline run c.yaml --set a.b=1"


def test_cpu_name_says_model_family_amx_and_bf16():
    from pipeline.provenance import cpu_name

    info = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512f avx512_bf16\n\n"
            "processor\t: 1\nmodel name\t: other\n")
    assert cpu_name(info) == "AMD EPYC (family 26 model 2), no AMX, AVX-512 BF16"
    xeon = ("model name\t: Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz\n"
            "flags\t\t: avx2 avx512f amx_bf16 amx_tile\n")
    assert cpu_name(xeon) == "Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz, AMX, AVX-512"
    assert cpu_name("model name\t: Old CPU\nflags\t\t: sse2 avx2\n").endswith(
        "no AMX, no AVX-512")
