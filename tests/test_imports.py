"""The import graph of src/esm_steer (module-level and function-level imports, read with ast)."""

from __future__ import annotations

import ast
from pathlib import Path

import esm_steer

ROOT = Path(esm_steer.__file__).parent
DATA = "esm_steer.data"
ABOVE_DATA = ("esm_steer.esm", "esm_steer.token2048", "esm_steer.evaluate", "esm_steer.engine")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the esm_steer modules it imports anywhere in its body. ``from a import b`` is an
    edge to ``a.b`` when that is a module, else to ``a``; a parent package is not an edge."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        edges = graph.setdefault(mod, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("esm_steer"))
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: resolve against this module's package
                    pkg = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    pkg = pkg[: len(pkg) - node.level + 1]
                    base = ".".join(pkg + ([base] if base else []))
                if not base.startswith("esm_steer"):
                    continue
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    edges.add(sub if sub in files else base)
        edges.discard(mod)
    return graph


def cycles(graph: dict[str, set[str]], within: str) -> list[list[str]]:
    """One cycle per strongly connected component (Tarjan) of the modules under ``within``."""
    nodes = {m for m in graph if m == within or m.startswith(within + ".")}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v] & nodes):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_module_and_function_level_imports():
    g = import_graph()
    assert "esm_steer.data.grading" in g["esm_steer.data.tasks"]  # module level
    assert "esm_steer.data.tasks" in g["esm_steer"]  # inside load_task / grade
    assert "esm_steer.data.grading.extract" in g["esm_steer.data.grading"]


def test_cycle_finder_finds_a_planted_cycle():
    g = {"esm_steer.data.a": {"esm_steer.data.b"}, "esm_steer.data.b": {"esm_steer.data.a"}, "esm_steer.x": set()}
    assert cycles(g, DATA) == [["esm_steer.data.a", "esm_steer.data.b"]]


def test_no_import_cycle_within_data():
    assert cycles(import_graph(), DATA) == []


def test_data_imports_nothing_above_it():
    bad = {
        (mod, dep)
        for mod, deps in import_graph().items()
        if mod == DATA or mod.startswith(DATA + ".")
        for dep in deps
        if any(dep == up or dep.startswith(up + ".") for up in ABOVE_DATA)
    }
    assert not bad, sorted(bad)
