"""The import graph of the package: layers import downward only and nothing imports in a
circle. Read from the source with `ast`, function-local imports included."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages")
# the application layer: commands and what only they use; everything else in pipeline/ is core
APPLICATION = {"pipeline.__main__", "pipeline.cli", "pipeline.runner", "pipeline.runconfig",
               "pipeline.plan", "pipeline.report", "pipeline.reference", "pipeline.export",
               "pipeline.evaluate", "pipeline.preflight"}
CORE, STAGES, APP = 0, 1, 2
LAYER_NAMES = {CORE: "core", STAGES: "stages", APP: "application"}


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def layer(name: str) -> int:
    if name == "stages" or name.startswith("stages."):
        return STAGES
    top = ".".join(name.split(".")[:2])
    return APP if top in APPLICATION else CORE


def imports_of(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `name` imports (the module named, not its parent packages)."""
    is_pkg = path.name == "__init__.py"
    here = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()

    def add(target: str) -> None:
        if target in known and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[:len(here) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                add(sub if sub in known else mod)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(name, path, known) for name, path in known.items()}


def test_layers_import_downward_only():
    bad = [f"{a} ({LAYER_NAMES[layer(a)]}) imports {b} ({LAYER_NAMES[layer(b)]})"
           for a, targets in graph().items() for b in sorted(targets) if layer(b) > layer(a)]
    assert not bad, "\n".join(bad)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_no_import_cycles():
    cycle = find_cycle(graph())
    assert cycle is None, " -> ".join(cycle)


def test_the_checker_sees_cycles_and_upward_imports():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    assert layer("pipeline.trainer") == CORE and layer("stages.prune") == STAGES
    assert layer("pipeline.report.tables") == APP and layer("pipeline.runner") == APP
    g = graph()
    assert "pipeline.config" in g["pipeline.runconfig"]  # relative imports resolved
    assert "stages" in g["pipeline.runconfig"]
