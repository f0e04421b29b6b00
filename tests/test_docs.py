"""The documents, configs and code comments speak of the project only, and the documents'
local links lead somewhere."""

from __future__ import annotations

import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
CODE = sorted(p for d in ("benchmarks", "pipeline", "stages") for p in (ROOT / d).rglob("*.py"))
# folders outside the repository, who worked on it, and numbered lists kept elsewhere
OUTSIDE = re.compile(r"\.\./shared|/work/|\blent\b|\bhelpers? (were|was) running|"
                     r"\bsessions?\b(?!\.\w)|\b(issue|item)s? #?\d+", re.IGNORECASE)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """The anchor GitHub gives a markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in path.read_text().splitlines()
            if re.match(r"#{1,6} ", line)}


def test_the_docs_are_where_the_readme_says():
    names = {p.relative_to(ROOT).as_posix() for p in DOCS}
    assert {"docs/pruning.md", "docs/config.md", "docs/results.md", "docs/design.md"} <= names
    assert len((ROOT / "README.md").read_text().splitlines()) <= 260


@pytest.mark.parametrize("path", DOCS + CONFIGS, ids=lambda p: p.name)
def test_no_words_from_outside_the_project(path):
    hits = [f"{n}: {line}" for n, line in enumerate(path.read_text().splitlines(), 1)
            if OUTSIDE.search(line)]
    assert hits == []


def text_of(path: Path) -> list[tuple[int, str]]:
    """(line, text) of a code file's comments and strings (docstrings, usage and messages)."""
    tokens = tokenize.generate_tokens(io.StringIO(path.read_text()).readline)
    kinds = {tokenize.COMMENT, tokenize.STRING, getattr(tokenize, "FSTRING_MIDDLE", -1)}
    return [(t.start[0], t.string) for t in tokens if t.type in kinds]


@pytest.mark.parametrize("path", CODE, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_no_words_from_outside_the_project_in_code_text(path):
    hits = [f"{n}: {text[:80]}" for n, text in text_of(path) if OUTSIDE.search(text)]
    assert hits == []


def test_the_outside_words_are_seen():
    for text in ("see ../shared/data", "as in issue 17", "(item 5)", "items 6 and 7",
                 "in this session"):
        assert OUTSIDE.search(text), text
    for text in ("issued", "the items of a list", "an ONNX InferenceSession",
                 "onnxruntime's config key session.force_spinning_stop"):
        assert not OUTSIDE.search(text), text


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_local_links_resolve(path):
    broken = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(target)
    assert broken == []


def test_slug_follows_github():
    assert slug(" Soft pruning (FPGM/SFP)") == "soft-pruning-fpgmsfp"
    assert slug(" Latency (benchmarks/pruned_latency.py)") == "latency-benchmarkspruned_latencypy"
