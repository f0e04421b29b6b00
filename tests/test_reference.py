"""docs/config.md, the config reference, is generated from the dataclasses and cannot drift."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline import reference as R
from pipeline.config import opt
from pipeline.runconfig import RunConfig
from pipeline.schedules import LinearScaling
from stages import REGISTRY


def walk(cls, prefix=""):
    """Every init field of a dataclass tree as a dotted key: an independent walk."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = prefix + f.metadata.get("key", f.name)
        yield key, f
        for arg in typing.get_args(hints[f.name]) or (hints[f.name],):
            if dataclasses.is_dataclass(arg):
                yield from walk(arg, key + ".")


def test_doc_block_is_current():
    assert R.DOC == Path(__file__).resolve().parent.parent / "docs" / "config.md"
    text = R.DOC.read_text()
    assert R.current_block(text) == R.generate(), (
        "docs/config.md is out of date: run python -m pipeline.reference --write")
    assert R.main(["--check"]) == 0


def test_every_key_is_documented_with_its_default():
    block = R.generate()
    classes = [("", RunConfig)] + [("", m.Config) for m in REGISTRY.values()]
    seen = 0
    for prefix, cls in classes:
        for key, f in walk(cls, prefix):
            assert str(f.metadata.get("help", "")).strip(), f"{cls.__name__}.{key}: no help text"
            assert f"| `{key}` |" in block or f"| `{key.split('.', 1)[-1]}` |" in block, key
            seen += 1
    assert seen > 80
    assert R.undocumented(R.all_rows()) == []
    rows = {r.key: r for r in R.all_rows()}
    assert rows["out_dir"].default == "`checkpoints`"
    assert rows["name"].default == "required"
    assert rows["stages.<pretrain>.schedule.milestones"].default == "`[]`"
    assert rows["stages.<finetune>.lr"].type == "number or {base, per_batch} or null"
    assert rows["stages.<finetune>.lr.per_batch"].default == "`256`"
    assert rows["seed"].meaning.endswith("(>= 0)")


def test_a_new_key_changes_the_reference_and_fails_the_check(tmp_path, monkeypatch):
    @dataclass
    class Scaling(LinearScaling):
        warm: int = opt(3, "a key added later, with its help text", min=0)

    @dataclass
    class Bare(LinearScaling):
        undocumented_key: float = opt(0.5)

    rows = {r.key: r for r in R.rows_of(Scaling, "lr.")}
    assert rows["lr.warm"] == R.Row("lr.warm", "integer", "`3`",
                                    "a key added later, with its help text (>= 0)")
    (bare,) = [r for r in R.rows_of(Bare) if r.key == "undocumented_key"]
    assert R.undocumented([bare]) == ["undocumented_key"]

    # a document whose block predates the new key: --check fails, --write repairs it
    doc = tmp_path / "config.md"
    doc.write_text(f"# title\n\n{R.START}\n{R.generate()}{R.END}\n\ntail\n")
    assert R.main(["--check", "--doc", str(doc)]) == 0
    real = R.rows_of

    def with_new_key(cls, prefix=""):
        out = real(cls, prefix)
        if cls is RunConfig:
            out.append(R.Row("new_key", "integer", "`1`", "added without regenerating"))
        return out

    monkeypatch.setattr(R, "rows_of", with_new_key)
    assert R.main(["--check", "--doc", str(doc)]) == 1
    assert R.main(["--write", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert "| `new_key` | integer | `1` | added without regenerating |" in text
    assert text.startswith("# title\n\n") and text.endswith("\n\ntail\n")
    assert R.main(["--check", "--doc", str(doc)]) == 0


def test_missing_markers_are_an_error(tmp_path, capsys):
    doc = tmp_path / "config.md"
    doc.write_text("# no markers\n")
    assert R.main(["--check", "--doc", str(doc)]) == 2
    assert "markers" in capsys.readouterr().err
    with pytest.raises(ValueError):
        R.splice("nothing", "x")
