"""The package's modules form layers: no import circle, counting the imports
written inside functions (a lazy import is still a dependency)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "transfer_tf"


def _module_name(path: pathlib.Path, package: pathlib.Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package=PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, read from the source of
    every ``.py`` file (top-level and function-level imports alike)."""
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # ``from a.b import c`` imports a.b, and a.b.c when c is a module
                targets = [node.module] + [
                    f"{node.module}.{alias.name}" for alias in node.names
                ]
            else:
                continue
            found.update(t for t in targets if t in files and t != name)
        # a package's __init__ is not a dependency worth a circle of its own
        graph[name] = {t for t in found if files[t].name != "__init__.py"}
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for other in sorted(graph.get(node, ())):
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in on_stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_circle_finder_finds_a_lazy_circle(tmp_path):
    package = tmp_path / "transfer_tf"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "low.py").write_text("def f():\n    from transfer_tf import high\n")
    (package / "high.py").write_text("from transfer_tf.low import f\n")
    (package / "other.py").write_text("import transfer_tf.low\n")
    graph = import_graph(package)
    assert graph["transfer_tf.other"] == {"transfer_tf.low"}
    assert circles(graph) == [["transfer_tf.high", "transfer_tf.low"]]


def test_no_module_of_the_package_imports_itself_back():
    graph = import_graph()
    assert len(graph) > 20 and graph["transfer_tf.studies.runner"]
    assert circles(graph) == []
