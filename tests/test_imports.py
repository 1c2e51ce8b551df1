"""The package's import graph, read with ``ast``: no cycles, a headless training library, a leaf fast path.

Every ``import`` statement counts, at module level or inside a function (a lazy import is still
a dependency). Importing ``a.b.c`` counts as an edge to ``a.b.c`` only, not to its parents.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ilmconvert"


def _modules() -> dict[str, Path]:
    """``{dotted name: file}`` of every module of the package (``__init__`` as the package name)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _imports(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The package modules that ``name`` imports, each with the line of its first import."""
    is_package = path.name == "__init__.py"
    edges: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        while target and target not in modules:  # `from pkg.mod import attr` -> pkg.mod
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = name.split(".")
                base = ".".join(parts[: len(parts) - node.level + (1 if is_package else 0)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            for alias in node.names:  # `from . import fast` names a module; `from .x import f` a symbol
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base, node.lineno)
    return edges


def _graph() -> dict[str, dict[str, int]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_correctly():
    graph = _graph()
    assert "ilmconvert.nn.fast_torch" in graph["ilmconvert.nn.fast"]  # from .fast_torch import ...
    assert "ilmconvert.nn.triton_ilm" in graph["ilmconvert.nn.fast"]  # lazy: from . import triton_ilm
    assert "ilmconvert.nn" in graph["ilmconvert.convert"]  # from .nn import ILMGroupNorm
    assert "ilmconvert.train.run" in graph["ilmconvert.cli.train"]  # from ..train.run import ... (in a function)
    assert _cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = _graph()
    cycles = _cycles(graph)
    described = [
        " -> ".join(f"{m} (line {graph[m][n]})" for m, n in zip(c, [*c[1:], c[0]]) if n in graph[m]) or ", ".join(c)
        for c in cycles
    ]
    assert not cycles, "import cycles: " + "; ".join(described)


def test_the_training_library_is_headless():
    """ilmconvert.train (and everything but the CLI and ``python -m ilmconvert``) imports neither
    typer, rich nor the CLI."""
    graph = _graph()
    for name, path in _modules().items():
        if name.startswith("ilmconvert.cli") or name == "ilmconvert.__main__":
            continue
        tree = ast.parse(path.read_text())
        imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and not n.level}
        assert not {m.split(".")[0] for m in imported} & {"typer", "rich", "click"}, name
        assert not any(m.startswith("ilmconvert.cli") for m in graph[name]), name


def test_the_fast_path_never_imports_the_layers():
    graph = _graph()
    fast_path = ("fast", "fast_torch", "triton_ilm", "triton_small", "cpu_kernel", "cpu_kernel_source", "cpu_op")
    for leaf in (f"ilmconvert.nn.{name}" for name in fast_path):
        assert not set(graph[leaf]) & {"ilmconvert.nn", "ilmconvert.nn.core", "ilmconvert.nn.layers"}, leaf
    assert not graph["ilmconvert.nn.fast_torch"], "fast_torch is a leaf"
