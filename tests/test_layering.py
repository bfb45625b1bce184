"""The package's modules form layers: no import circle, counting the imports
written inside functions (a lazy import is still a dependency); capability
modules never import ``transfer_tf.studies``; a study (a package under
``transfer_tf/studies/``) never imports another study: shared needs go down a
floor (``studies/*.py`` or a capability module)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "transfer_tf"


def _module_name(path: pathlib.Path, package: pathlib.Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _targets(node, name: str, is_package: bool, files) -> list[str]:
    """The modules of the package an import statement names (relative imports
    resolved against ``name``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    module = node.module
    if node.level:
        parts = name.split(".")
        base = parts if is_package else parts[:-1]
        base = base[: len(base) - (node.level - 1)]
        module = ".".join(base + ([module] if module else []))
    if not module:
        return []
    # ``from a.b import c`` imports a.b, and a.b.c when c is a module
    return [module] + [f"{module}.{alias.name}" for alias in node.names]


def import_targets(package=PACKAGE) -> dict[str, set[str]]:
    """``{module: modules of the package it imports}``, read from the source of
    every ``.py`` file (top-level and function-level imports alike; a package's
    ``__init__`` counts as the package)."""
    files = {_module_name(p, package): p for p in package.rglob("*.py")}
    found = {}
    for name, path in files.items():
        tree = ast.parse(path.read_text(), str(path))
        is_package = path.name == "__init__.py"
        found[name] = {
            t
            for node in ast.walk(tree)
            for t in _targets(node, name, is_package, files)
            if t in files and t != name
        }
    return found


def import_graph(package=PACKAGE) -> dict[str, set[str]]:
    """:func:`import_targets` without the packages' ``__init__`` modules (not a
    dependency worth a circle of its own)."""
    inits = {
        _module_name(p, package)
        for p in package.rglob("__init__.py")
        if p.parent != package
    }
    return {
        name: {t for t in targets if t not in inits}
        for name, targets in import_targets(package).items()
    }


def study_of(module: str, package=PACKAGE) -> str | None:
    """The study a module belongs to (``transfer_tf.studies.fine_tuning.plan``:
    ``fine_tuning``): a package under ``studies/``; None for the rest."""
    parts = module.split(".")
    if len(parts) < 3 or parts[1] != "studies":
        return None
    candidate = package / "studies" / parts[2]
    return parts[2] if (candidate / "__init__.py").is_file() else None


def trespasses(package=PACKAGE) -> list[str]:
    """Every import that breaks the floors: a capability module importing
    ``transfer_tf.studies`` (anything of it), a study importing another study."""
    top = package.name
    out = []
    for module, targets in sorted(import_targets(package).items()):
        capability = not module.startswith(f"{top}.studies")
        study = study_of(module, package)
        for target in sorted(targets):
            if capability and target.startswith(f"{top}.studies"):
                out.append(f"capability {module} imports {target}")
            other = study_of(target, package)
            if study and other and other != study:
                out.append(f"study {module} imports study {target}")
    return out


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


def test_the_floor_checker_finds_a_study_reaching_into_another(tmp_path):
    package = tmp_path / "transfer_tf"
    for folder in ("", "studies", "studies/alpha", "studies/beta"):
        (package / folder).mkdir(parents=True, exist_ok=True)
        (package / folder / "__init__.py").write_text("")
    (package / "models.py").write_text("")
    (package / "studies" / "runner.py").write_text("from transfer_tf import models\n")
    (package / "studies" / "sources.py").write_text(
        "from transfer_tf.studies import runner\n"
    )
    alpha = package / "studies" / "alpha"
    (alpha / "plan.py").write_text(
        "from transfer_tf.studies import runner, sources\n"
        "from transfer_tf.studies.alpha import execution\n"
    )
    (alpha / "execution.py").write_text("from . import plan\n")
    (package / "studies" / "beta" / "plan.py").write_text("")
    assert trespasses(package) == []
    # Inside a function, relative, through the package's face: all found.
    (alpha / "execution.py").write_text(
        "def f():\n    from transfer_tf.studies import beta\n"
    )
    (alpha / "summary.py").write_text("from ..beta import plan\n")
    (package / "models.py").write_text(
        "def g():\n    import transfer_tf.studies.runner\n"
    )
    assert trespasses(package) == [
        "capability transfer_tf.models imports transfer_tf.studies.runner",
        "study transfer_tf.studies.alpha.execution imports study "
        "transfer_tf.studies.beta",
        "study transfer_tf.studies.alpha.summary imports study "
        "transfer_tf.studies.beta",
        "study transfer_tf.studies.alpha.summary imports study "
        "transfer_tf.studies.beta.plan",
    ]


def test_capabilities_know_no_study_and_no_study_knows_another():
    assert trespasses() == []
