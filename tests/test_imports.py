"""The shape of src/esm_steer, read with ast: the import graph (module-level and function-level
imports) has no cycle and runs one way, no source file is over 400 lines, and imports inside
functions are only the optional heavy ones."""

from __future__ import annotations

import ast
from pathlib import Path

import esm_steer

ROOT = Path(esm_steer.__file__).parent
PACKAGE = "esm_steer"
DATA = "esm_steer.data"
ENGINE = "esm_steer.engine"
METHOD = ("esm_steer.esm", "esm_steer.token2048", "esm_steer.evaluate")  # the method and its stages
ABOVE_DATA = (*METHOD, ENGINE)
MAX_LINES = 400
# The only modules imported inside functions, each because importing it at the top would cost
# every command that never uses it, or break it:
LAZY_OK = {
    "vllm",  # optional extra (pip install .[vllm]); it reads its environment at import, set by from_config
    "faiss",  # its native library and OpenMP load only where a memory index is built or read
    "datasets",  # ~1 s (huggingface_hub, fsspec); only when a task's rows come from the hub
    # the symbolic checker: optional at run time (the grader falls back without it), seconds to
    # import the first time, so it is imported once outside the grading deadline
    "math_verify",
    "sympy",
    "latex2sympy2_extended",
    "mlflow",  # optional extra (pip install .[tracking]), seconds to import; only with logger=mlflow
}


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


def under(mod: str, *packages: str) -> bool:
    return any(mod == p or mod.startswith(p + ".") for p in packages)


def upward_imports(graph: dict[str, set[str]], lower: tuple[str, ...], upper: tuple[str, ...]) -> set[tuple[str, str]]:
    """(module, dependency) pairs where a module under ``lower`` imports one under ``upper``."""
    return {(mod, dep) for mod, deps in graph.items() if under(mod, *lower) for dep in deps if under(dep, *upper)}


def function_imports(source: str) -> set[tuple[int, str]]:
    """(line, top-level package) of every absolute import inside a function body (relative
    imports name this package)."""
    out: set[tuple[int, str]] = set()
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            if isinstance(node, ast.Import):
                out.update((node.lineno, a.name.split(".")[0]) for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                out.add((node.lineno, PACKAGE if node.level else (node.module or "").split(".")[0]))
    return out


def source_files() -> dict[str, Path]:
    return {str(p.relative_to(ROOT.parent)): p for p in sorted(ROOT.rglob("*.py"))}


def test_graph_sees_module_and_function_level_imports():
    g = import_graph()
    assert "esm_steer.data.grading" in g["esm_steer.data.tasks"]  # module level
    assert "esm_steer.data.tasks" in g["esm_steer"]  # inside load_task / grade
    assert "esm_steer.data.grading.extract" in g["esm_steer.data.grading"]


def test_cycle_finder_finds_a_planted_cycle():
    g = {"esm_steer.data.a": {"esm_steer.data.b"}, "esm_steer.data.b": {"esm_steer.data.a"}, "esm_steer.x": set()}
    assert cycles(g, DATA) == [["esm_steer.data.a", "esm_steer.data.b"]]
    across = {"esm_steer.engine.a": {"esm_steer.esm.b"}, "esm_steer.esm.b": {"esm_steer.io"}, "esm_steer.io": {ENGINE}}
    across[ENGINE] = {"esm_steer.engine.a"}
    assert cycles(across, PACKAGE) == [[ENGINE, "esm_steer.engine.a", "esm_steer.esm.b", "esm_steer.io"]]
    assert cycles(across, DATA) == []


def test_no_import_cycle_within_data():
    assert cycles(import_graph(), DATA) == []


def test_no_import_cycle_anywhere():
    assert cycles(import_graph(), PACKAGE) == []


def test_data_imports_nothing_above_it():
    bad = upward_imports(import_graph(), (DATA,), ABOVE_DATA)
    assert not bad, sorted(bad)


def test_engine_imports_nothing_of_the_method():
    bad = upward_imports(import_graph(), (ENGINE,), METHOD)
    assert not bad, sorted(bad)


def test_upward_import_finder_sees_a_planted_edge():
    g = {"esm_steer.engine.x": {"esm_steer.esm.online", "esm_steer.io"}, "esm_steer.esm.online": {"esm_steer.engine"}}
    assert upward_imports(g, (ENGINE,), METHOD) == {("esm_steer.engine.x", "esm_steer.esm.online")}


def test_no_source_file_over_400_lines():
    long = {name: n for name, p in source_files().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_function_import_finder():
    src = "import json\n\ndef f():\n    import faiss\n    from .io import x\n"
    assert function_imports(src) == {(4, "faiss"), (5, PACKAGE)}
    assert function_imports("class A:\n    def m(self):\n        from hydra import compose\n") == {(3, "hydra")}


def test_imports_inside_functions_only_for_optional_heavy_modules():
    lazy = sorted(
        f"{name}:{line} {mod}"
        for name, p in source_files().items()
        for line, mod in function_imports(p.read_text())
        if mod not in LAZY_OK
    )
    assert not lazy, "imports inside functions: " + ", ".join(lazy)


# the stage drivers (esm_steer.pipelines.STAGE_FUNCTIONS): only the stage runner composes them
STAGE_DRIVERS = (
    "esm_steer.esm.mine",
    "esm_steer.esm.select",
    "esm_steer.esm.memory",
    "esm_steer.evaluate.eval",
    "esm_steer.evaluate.case",
    "esm_steer.token2048.pipeline",
)


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph.get(todo.pop(), set()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_no_stage_driver_reaches_another_and_the_runner_imports_them_directly():
    from esm_steer import pipelines

    g = import_graph()
    bad = {(s, t) for s in STAGE_DRIVERS for t in reachable(g, s) & set(STAGE_DRIVERS) if t != s}
    assert not bad, sorted(bad)
    assert set(STAGE_DRIVERS) <= g["esm_steer.pipelines"]  # an edge the graph sees, not a string
    assert {f.__module__ for f in pipelines.STAGE_FUNCTIONS.values()} == set(STAGE_DRIVERS)


def test_the_method_stages_import_nothing_of_evaluation():
    bad = upward_imports(import_graph(), ("esm_steer.esm", "esm_steer.token2048"), ("esm_steer.evaluate",))
    assert not bad, sorted(bad)
