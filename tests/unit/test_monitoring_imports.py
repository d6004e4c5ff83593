"""Monitoring's modules import one way: no cycle, no import hidden in a function to dodge one, and
no `except ImportError` that would silently turn a part (alerting, policies) off."""

from __future__ import annotations

import ast
from pathlib import Path

import carrara.monitoring

PACKAGE = Path(carrara.monitoring.__file__).parent
# The CLI entry point imports lazily so `--help` stays fast; it is no part of a cycle.
LAZY_ENTRY_POINTS = {"cli"}


def _modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def _imported(node: ast.AST) -> set[str]:
    """The carrara.monitoring modules `node` (an import statement) names."""
    names: set[str] = set()
    if isinstance(node, ast.Import):
        names = {a.name for a in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module:
        if node.module == "carrara.monitoring":
            names = {f"carrara.monitoring.{a.name}" for a in node.names}
        else:
            names = {node.module}
    prefix = "carrara.monitoring."
    return {n.removeprefix(prefix).split(".")[0] for n in names if n.startswith(prefix)}


def test_no_project_import_inside_a_function() -> None:
    found = []
    for name, tree in _modules().items():
        if name in LAZY_ENTRY_POINTS:
            continue
        for func in ast.walk(tree):
            if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(func):
                if isinstance(node, ast.Import | ast.ImportFrom):
                    module = node.module if isinstance(node, ast.ImportFrom) else None
                    targets = [module] if module else [a.name for a in node.names]
                    if any(t and t.startswith("carrara") for t in targets):
                        found.append(f"{name}.{func.name}: line {node.lineno}")
    assert found == []


def test_no_except_import_error() -> None:
    found = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ExceptHandler) and node.type is not None:
                caught = ast.unparse(node.type)
                if "ImportError" in caught or "ModuleNotFoundError" in caught:
                    found.append(f"{name}: line {node.lineno}")
    assert found == []


def test_monitoring_modules_import_each_other_without_a_cycle() -> None:
    graph = {
        name: {m for node in ast.walk(tree) for m in _imported(node)} - {name}
        for name, tree in _modules().items()
    }
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name in done:
            return
        for imported in sorted(graph.get(name, set())):
            visit(imported, (*path, name))
        done.add(name)

    for name in sorted(graph):
        visit(name, ())


def test_the_rules_are_pure() -> None:
    tree = _modules()["rules"]
    imported = {
        (node.module if isinstance(node, ast.ImportFrom) else alias.name) or ""
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    impure = {"sqlalchemy", "confluent_kafka", "carrara.models", "carrara.db"}
    assert not {m for m in imported if m.split(".")[0] in impure or m in impure}
