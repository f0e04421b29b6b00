"""The documents speak of the project only, and their local links lead somewhere."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
OUTSIDE = re.compile(r"\.\./shared|\blent\b|\bhelpers? (were|was) running|\bsessions?\b",
                     re.IGNORECASE)
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
