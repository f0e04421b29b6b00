"""Hostile inputs: names that are paths, planted symbolic links, exports over a run's own
files, a stopped --restart, YAML alias bombs, absurd counts and batches, file modes.

Every refused case exits with its code, says so in ONE line naming the key or the file, and
leaves everything outside the run directory as it was (`outside_untouched`, snapshot taken
after the test's own inputs and planted links are written)."""

from __future__ import annotations

import json
import os
import signal
import stat
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, deep_update
from pipeline import checkpoint as ckpt
from pipeline import preemption, safefs
from pipeline.atomic import atomic_write_text
from pipeline.restarts import LEDGER_FILE
from pipeline.trainer import CallbackHook

pytestmark = pytest.mark.usefixtures("one_thread")


def one_error(err: str, *needles: str, only: bool = True) -> str:
    """The single `error:` line of stderr (the whole of it when `only`), holding `needles`."""
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err
    if only:
        assert err.strip() == lines[0], err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False, allow_unicode=False))
    return path


def tiny(tmp_path: Path, **over) -> dict:
    cfg = deep_update(TINY, {"device": "cpu", "out_dir": str(tmp_path / "runs"), **over})
    cfg["stages"]["pretrain"]["epochs"] = 1
    return cfg


# ----------------------------------------------------------------- 1. names that are paths

BAD_NAMES = {
    "absolute": "/tmp/victim", "parent": "../x", "dotdot": "..", "dot": ".", "nested": "a/b",
    "empty": "", "nul": "a\x00b", "long": "x" * 101, "newline": "a\nb", "tab": "a\tb",
    "escape": "\x1b[31mred", "hidden": ".hidden", "backslash": "a\\b", "space": "a b",
    "restart-folder": "pretrain.restart", "run-file": "config.yaml",
    "case-twin": "Pretrain",
}


@pytest.mark.parametrize("bad", list(BAD_NAMES.values()), ids=list(BAD_NAMES))
@pytest.mark.parametrize("where", ["stage", "run"])
def test_names_must_be_plain(bad, where, tmp_path, cli, outside_untouched):
    cfg = tiny(tmp_path)
    if where == "stage":
        if bad == "Pretrain":  # a second stage whose folder is the first one's elsewhere
            cfg["stages"][bad] = {"type": "prune", "from": "pretrain", "ratio": 0.5}
        else:
            cfg["stages"] = {bad: cfg["stages"]["pretrain"]}
    else:
        if bad in ("pretrain.restart", "config.yaml", "Pretrain"):
            return  # fine as a run's name
        cfg["name"] = bad
    path = write_config(tmp_path / "c.yaml", cfg)
    guard = outside_untouched(tmp_path)  # nothing is written anywhere, run dir included
    for args in (["--dry-run"], [], ["--restart"]):
        code, _, err = cli("run", path, *args)
        assert code == 2, err
        one_error(err, str(path), "stages" if where == "stage" else "name")
    guard.check()


def test_the_escape_probe_exits_2(tmp_path, cli):
    cfg = {"base": str(Path(__file__).resolve().parent.parent / "configs" / "smoke.yaml"),
           "out_dir": str(tmp_path / "out"),
           "stages": {"../../escape": {"type": "prune", "from": "pretrain", "method": "l1",
                                       "ratio": 0.5}}}
    path = write_config(tmp_path / "c.yaml", cfg)
    code, _, err = cli("run", path, "--dry-run")
    assert code == 2
    one_error(err, "'../../escape'")


@pytest.mark.parametrize("target", ["..", ".", "", "../other", "/elsewhere", "sub/../..",
                                    "link/x"], ids=repr)
def test_deletes_and_replaces_stay_strictly_inside(target, tmp_path, outside_untouched):
    run = tmp_path / "run"
    (run / "sub").mkdir(parents=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (run / "link").symlink_to(tmp_path / "other")
    guard = outside_untouched(tmp_path, run)
    path = target if target.startswith("/") else run / target
    if target == "/elsewhere":
        path = tmp_path / "elsewhere"
    for act in (lambda: safefs.remove_tree(run, path), lambda: safefs.remove_file(run, path),
                lambda: safefs.replace(run, run / "sub", path)):
        with pytest.raises(safefs.UnsafePathError, match="refused"):
            act()
    guard.check()
    assert (run / "sub").is_dir()
    with pytest.raises(safefs.UnsafePathError, match="symbolic link"):
        safefs.remove_tree(run, run / "link")  # the link itself is inside; never followed
    safefs.remove_tree(run, run / "sub")  # strictly inside: done
    assert not (run / "sub").exists()


# ------------------------------------------------------------- 2. planted symbolic links

PLANTS = {  # what is planted in the run directory -> what the error names
    "log.txt": "log.txt", "provenance.log.jsonl": "provenance.log.jsonl",
    "run.lock": "run.lock", "pretrain/metrics.csv": "metrics.csv",
    "pretrain/train_log.csv": "train_log.csv", "pretrain": "pretrain", ".": "runs/tiny",
}


@pytest.mark.parametrize("plant", list(PLANTS), ids=list(PLANTS))
def test_planted_links_are_refused(plant, tmp_path, cli, outside_untouched):
    cfg = tiny(tmp_path)
    cfg["stages"]["pretrain"]["log_interval"] = 1
    path = write_config(tmp_path / "c.yaml", cfg)
    run_dir = tmp_path / "runs" / "tiny"
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "bashrc").write_text("echo hello\n")
    link = run_dir if plant == "." else run_dir / plant
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim if plant in (".", "pretrain") else victim / "bashrc")
    guard = outside_untouched(tmp_path, run_dir)
    code, _, err = cli("run", path, "--stage", "pretrain")
    assert code == 2, err
    one_error(err, PLANTS[plant], only=False)
    guard.check()
    assert (victim / "bashrc").read_text() == "echo hello\n"
    assert sorted(p.name for p in victim.iterdir()) == ["bashrc"]


def test_atomic_write_replaces_a_planted_link(tmp_path, outside_untouched):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "summary.json").symlink_to(victim)
    guard = outside_untouched(tmp_path, run)
    atomic_write_text(run / "summary.json", "{}\n")
    guard.check()
    assert not (run / "summary.json").is_symlink()
    assert victim.read_text() == "keep\n"


# ------------------------------------------------------------ a completed run, shared below


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A completed tiny run (pretrain 1 epoch, prune) made through the CLI in-process."""
    from pipeline.cli import main

    base = tmp_path_factory.mktemp("hostile")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    before = os.umask(0o022)
    try:
        cfg = tiny(base)
        cfg["stages"].pop("finetune")
        assert main(["run", str(write_config(base / "c.yaml", cfg)), "--progress", "off"]) == 0
    finally:
        os.umask(before)
        torch.set_num_threads(threads)
    return base / "runs" / "tiny"


# ------------------------------------------------------------ 3. export over existing files

RUN_FILES = ["pretrain/model.pt", "pretrain/last.pt", "pretrain/best.pt",
             "pretrain/summary.json", "config.yaml", "pretrain/metrics.csv",
             "pretrain/model.pt.json", "prune/layers.json", "provenance.json"]


@pytest.mark.parametrize("target", RUN_FILES)
def test_export_never_replaces_a_run_file(target, done_run, cli, outside_untouched):
    out = done_run / target
    guard = outside_untouched(done_run.parent)  # the run directory included
    code, _, err = cli("export", done_run / "prune", "--format", "torchscript", "--out", out,
                       "--force")
    assert code == 2, err
    one_error(err, str(out), "--force")
    guard.check()


def test_export_refuses_an_existing_file_without_force(done_run, tmp_path, cli,
                                                       outside_untouched):
    (tmp_path / "kept").mkdir()
    out = tmp_path / "kept" / "deploy.torchscript.pt"
    out.write_bytes(b"an older export")
    sidecar_only = tmp_path / "kept" / "other.torchscript.pt"
    Path(f"{sidecar_only}.json").write_text("{}")
    guard = outside_untouched(tmp_path / "kept")
    for target in (out, sidecar_only):
        code, _, err = cli("export", done_run / "prune", "--format", "torchscript",
                           "--out", target)
        assert code == 2, err
        one_error(err, str(target), "--force")
    guard.check()
    forced = tmp_path / "forced.torchscript.pt"
    forced.write_bytes(b"an older export")
    code, _, err = cli("export", done_run / "prune", "--format", "torchscript", "--out",
                       forced, "--force")
    assert code == 0, err
    assert forced.read_bytes() != b"an older export"


# ------------------------------------------------------------ 4. a stopped --restart resumes


def run_hooked(capsys, after_step, *args) -> tuple[int, str]:
    """The CLI in-process with a trainer hook run after every step: (exit code, stderr)."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args], hooks=[CallbackHook(after_step=after_step)])
    return code, capsys.readouterr().err


def test_a_stopped_restart_resumes_bitwise(tmp_path, cli, capsys):
    cfg = tiny(tmp_path)
    cfg["stages"]["pretrain"]["epochs"] = 2  # 3 steps per epoch
    cfg["stages"].pop("finetune")
    path = write_config(tmp_path / "c.yaml", cfg)
    run_dir = tmp_path / "runs" / "tiny"
    assert cli("run", path, "--progress", "off")[0] == 0
    # the uninterrupted restart, in a copy of the run
    ref_path = write_config(tmp_path / "ref.yaml", {**cfg, "out_dir": str(tmp_path / "ref")})
    assert cli("run", ref_path, "--progress", "off")[0] == 0
    code, _, err = cli("run", ref_path, "--restart", "--progress", "off")
    assert code == 0, err
    first = json.loads((run_dir / "pretrain" / "summary.json").read_text())

    def stop_at_4(t) -> None:
        if t.stage == "pretrain" and t.global_step == 4:
            preemption.request(signal.SIGTERM)

    code, err = run_hooked(capsys, stop_at_4, "run", path, "--restart", "--progress", "off")
    assert code == 143, err
    (line,) = [x for x in err.splitlines() if x.startswith("stopped:")]
    assert "run the same command to resume" in line
    assert ckpt.load(run_dir / "pretrain.restart" / "last.pt")["global_step"] == 4
    assert json.loads((run_dir / "pretrain" / "summary.json").read_text()) == first  # kept
    assert (run_dir / LEDGER_FILE).is_file()
    code, _, err = cli("run", path, "--restart", "--progress", "off")  # the same command
    assert code == 0, err
    assert "resumed from" in err and "step 4" in err
    assert not (run_dir / "pretrain.restart").exists() and not (run_dir / LEDGER_FILE).exists()
    for stage in ("pretrain", "prune"):
        a = ckpt.load(run_dir / stage / "model.pt")["state_dict"]
        b = ckpt.load(tmp_path / "ref" / "tiny" / stage / "model.pt")["state_dict"]
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), stage
    assert json.loads((run_dir / "pretrain" / "summary.json").read_text())["finished"] >= \
        first["finished"]
    # a new --restart after a finished one starts afresh (nothing left to take up)
    code, _, err = cli("run", path, "--restart", "--stage", "prune", "--progress", "off")
    assert code == 0 and "taking up" not in err


def test_a_stopped_restart_keeps_the_stages_it_finished(tmp_path, cli, capsys):
    cfg = tiny(tmp_path)
    cfg["stages"]["finetune"]["epochs"] = 2
    path = write_config(tmp_path / "c.yaml", cfg)
    run_dir = tmp_path / "runs" / "tiny"
    assert cli("run", path, "--progress", "off")[0] == 0

    def stop(t) -> None:
        if t.stage == "finetune" and t.global_step == 2:
            preemption.request(signal.SIGTERM)

    assert run_hooked(capsys, stop, "run", path, "--restart", "--progress", "off")[0] == 143
    restarted = {s: json.loads((run_dir / s / "summary.json").read_text())["finished"]
                 for s in ("pretrain", "prune")}
    code, _, err = cli("run", path, "--restart", "--progress", "off")
    assert code == 0, err
    assert "stage pretrain: already restarted" in err
    for s, finished in restarted.items():  # not trained a third time
        assert json.loads((run_dir / s / "summary.json").read_text())["finished"] == finished


# ------------------------------------------------- 5-7. alias bombs, counts, export batch

BOMB = "\n".join(["a0: &a0 [x, x, x, x, x, x, x, x, x]"] + [
    f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 9)]) + "\n"

CONFIG_CASES = {  # id: (YAML text appended to, or update of, the tiny config; needles)
    "alias-bomb": (BOMB + "name: *a8\n", ["alias bomb", "line"]),
    "alias-bomb-stage": (BOMB + "stages: {pretrain: {type: pretrain, extra: *a8}}\n",
                         ["alias bomb"]),
    "recursive-alias": ("loop: &l [*l]\n", ["recursive alias"]),
    "huge-value": ({"stages": {"pretrain": {"typo_key": list(range(3000))}}},
                   ["stages.pretrain.typo_key"]),
    "huge-string": ({"name": "n" * 100000}, ["name", "100000 characters"]),
    "epochs-1e20": ({"stages": {"pretrain": {"epochs": 1e20}}},
                    ["stages.pretrain.epochs", "100,000"]),
    "epochs-2^70": ({"stages": {"pretrain": {"epochs": 2**70}}}, ["stages.pretrain.epochs"]),
    "seed-2^63": ({"seed": 2**63}, ["seed", "2^63"]),
    "seed-negative": ({"seed": -1}, ["seed", ">= 0"]),
    "train-samples-2^64": ({"data": {"train_samples": 2**64}}, ["data.train_samples", "2^63"]),
    "batch-1e9": ({"stages": {"pretrain": {"batch_size": 10**9}}},
                  ["stages.pretrain.batch_size", "1,048,576"]),
    "warmup-epochs": ({"stages": {"pretrain": {"schedule": {"warmup": {
        "type": "gradual", "epochs": 1e12}}}}}, ["schedule.warmup.epochs"]),
    "milestones": ({"stages": {"pretrain": {"schedule": {"milestones": [1e15]}}}},
                   ["schedule.milestones"]),
    "save-epochs": ({"stages": {"pretrain": {"save_epochs": [10**12]}}},
                    ["stages.pretrain.save_epochs"]),
    "checkpoint-steps": ({"stages": {"pretrain": {"checkpoint_every_steps": 2**64}}},
                         ["checkpoint_every_steps", "2^63"]),
    "image-size": ({"data": {"synthetic": {"image_size": 10**6}}},
                   ["data.synthetic.image_size"]),
    "synthetic-classes": ({"data": {"synthetic": {"num_classes": 10**12}}},
                          ["data.synthetic.num_classes"]),
    "val-seed": ({"data": {"val_seed": -5}}, ["data.val_seed"]),
    "giant-int-literal": ("seed: " + "9" * 5000 + "\n", ["invalid YAML"]),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES), ids=list(CONFIG_CASES))
def test_config_bombs_and_bounds(case, tmp_path, cli, outside_untouched):
    over, needles = CONFIG_CASES[case]
    cfg = tiny(tmp_path)
    path = tmp_path / "c.yaml"
    if isinstance(over, str):  # raw YAML: its keys win over the tiny config's
        text = yaml.safe_dump(cfg, sort_keys=False)
        keys = {line.split(":")[0] for line in over.splitlines() if ":" in line}
        kept = yaml.safe_load(text)
        for k in keys:
            kept.pop(k, None)
        path.write_text(yaml.safe_dump(kept, sort_keys=False) + over)
    else:
        write_config(path, deep_update(cfg, over))
    guard = outside_untouched(tmp_path)
    for args in (["--dry-run"], ["--progress", "off"]):
        code, _, err = cli("run", path, *args)
        assert code == 2, err
        line = one_error(err, str(path), *needles)
        assert len(line) < 1000, line  # values in messages are capped
    guard.check()


def test_largest_seed_runs(tmp_path, cli):
    cfg = tiny(tmp_path, seed=2**63 - 1)
    cfg["stages"] = {"pretrain": {**cfg["stages"]["pretrain"], "mixup": 0.2}}
    code, _, err = cli("run", write_config(tmp_path / "c.yaml", cfg), "--progress", "off")
    assert code == 0, err


CLI_BATCHES = {
    "export-batch": (["export", "{stage}", "--format", "onnx", "--batch", "100000"],
                     ["--batch 100000", "4096"]),
    "eval-batch": (["eval", "{stage}", "--batch-size", "1000000000"], ["--batch-size"]),
    "latency-batch": (["compare", "{run}", "--latency", "--latency-batch", "1000000"],
                      ["--latency-batch"]),
}


@pytest.mark.parametrize("case", list(CLI_BATCHES), ids=list(CLI_BATCHES))
def test_command_line_batches_are_bounded(case, done_run, cli, outside_untouched):
    args, needles = CLI_BATCHES[case]
    args = [a.format(stage=done_run / "prune", run=done_run) for a in args]
    guard = outside_untouched(done_run.parent)
    code, _, err = cli(*args)
    assert code == 2, err
    one_error(err, *needles)
    guard.check()


def test_export_batch_that_does_not_fit_in_memory(done_run, cli, monkeypatch, tmp_path):
    from pipeline.export import target

    monkeypatch.setattr(target, "available_memory", lambda: 1 << 20)  # 1 MiB free
    code, _, err = cli("export", done_run / "prune", "--format", "torchscript", "--batch",
                       "4096", "--out", tmp_path / "x.torchscript.pt")
    assert code == 2, err
    one_error(err, "--batch 4096", "GiB", "--dynamic-batch")
    assert not (tmp_path / "x.torchscript.pt").exists()


# ------------------------------------------------------------------------ 23. file modes


def test_atomic_files_have_the_modes_of_the_logs(done_run):
    log_mode = stat.S_IMODE((done_run / "log.txt").stat().st_mode)
    assert log_mode == 0o644  # the run was made under umask 022
    for name in ("config.yaml", "provenance.json", "pretrain/model.pt", "pretrain/last.pt",
                 "pretrain/best.pt", "pretrain/summary.json", "prune/model.pt",
                 "prune/summary.json", "prune/layers.json"):
        assert stat.S_IMODE((done_run / name).stat().st_mode) == log_mode, name


@pytest.mark.parametrize("mask, mode", [(0o077, 0o600), (0o002, 0o664), (0o022, 0o644)])
def test_atomic_write_follows_the_umask(mask, mode, tmp_path):
    before = os.umask(mask)
    try:
        atomic_write_text(tmp_path / "f.json", "{}")
    finally:
        os.umask(before)
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == mode


def test_compare_shows_an_unreadable_summary_as_such(done_run, tmp_path, cli):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(done_run, run)
    (run / "prune" / "summary.json").write_text("\x00 not json")
    code, out, err = cli("compare", run, "--format", "json", "--out", tmp_path / "report")
    assert code == 0, err
    rows = {r["stage"]: r for r in json.loads(out)}
    assert rows["prune"]["status"] == "unreadable" and rows["pretrain"]["status"] == "completed"


def test_compare_refuses_a_planted_report_link(done_run, tmp_path, cli, outside_untouched):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(done_run, run)
    victim = tmp_path / "victim"
    victim.mkdir()
    (run / "report").symlink_to(victim)
    guard = outside_untouched(tmp_path, run)
    code, _, err = cli("compare", run)
    assert code == 2, err
    one_error(err, str(run / "report"), "symbolic link", only=False)
    guard.check()
    assert not any(victim.iterdir())
