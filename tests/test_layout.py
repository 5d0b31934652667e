"""The package's layout (docs/architecture.md): no import circles, no argparse outside the CLIs, small modules.

Read from the sources, not imported: what is checked is the code as written.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "plugin" / "neuralink"
# modules that are command lines: the dispatcher, each stage's cli.py, the demo, the bench worker's entry point
CLI_MODULES = {"neuralink.cli", "neuralink.command", "neuralink.demo", "neuralink.evaluate.bench.worker"}
MAX_MODULE_LINES = 500


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported_modules(path: Path) -> set[str]:
    """The neuralink modules `path` imports anywhere (module or function level), TYPE_CHECKING blocks aside."""
    tree = ast.parse(path.read_text())
    guarded = [node for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)]
    skipped = {id(n) for node in guarded for n in ast.walk(node)}
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            while name and name not in MODULES:
                name = name.rpartition(".")[0]
            if name.startswith("neuralink"):
                found.add(name)
    return found


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


def module_graph() -> dict[str, set[str]]:
    graph = {}
    for name, path in MODULES.items():
        # a module importing its own package's face (__init__) is not an edge of the graph
        graph[name] = {m for m in imported_modules(path) if m != name and not name.startswith(m + ".")}
    return graph


def package_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 or MODULES[module].name == "__init__.py" else module


def test_modules_import_each_other_without_circles() -> None:
    assert circles(module_graph()) == []


def test_stages_import_each_other_without_circles() -> None:
    graph: dict[str, set[str]] = {}
    for module, imported in module_graph().items():
        for other in imported:
            if package_of(module) != package_of(other):
                graph.setdefault(package_of(module), set()).add(package_of(other))
    assert circles(graph) == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_only_command_lines_import_argparse(name: str) -> None:
    if name in CLI_MODULES or name.endswith(".cli"):
        return
    assert "argparse" not in {a.name for node in ast.walk(ast.parse(MODULES[name].read_text()))
                              if isinstance(node, ast.Import) for a in node.names}, f"{name} imports argparse"


def test_no_module_is_asking_to_be_split() -> None:
    long = {name: n for name, path in MODULES.items() if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert long == {}
