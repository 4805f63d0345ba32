"""The layout's rules, checked from the source (docs/architecture.md explains them).

- only the ``ckpttool.cli`` package imports click, and only it names command-line flags;
- no import circles between the package's modules (lazy imports inside functions count too);
- modules and functions stay small enough to read.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "ckpttool"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]+")
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> Iterator[tuple[str, Path, ast.Module]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path, ast.parse(path.read_text(), str(path))


def _docstrings(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def _imports(name: str, path: Path, tree: ast.Module) -> set[str]:
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _is_cli(name: str) -> bool:
    """Whether module ``name`` is part of the command line (the ``ckpttool.cli`` package)."""
    return name.startswith("ckpttool.cli")


def test_only_the_cli_imports_click() -> None:
    offenders = [
        name
        for name, path, tree in modules()
        if not _is_cli(name)
        and any(i == "click" or i.startswith("click.") for i in _imports(name, path, tree))
    ]
    assert offenders == []


def test_no_library_message_names_a_flag() -> None:
    """Library text says what is wrong in domain words; the CLI spells the fix as flags."""
    offenders = []
    for name, _path, tree in modules():
        if _is_cli(name):
            continue
        docs = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and isinstance(node.value, str)
                and id(node) not in docs
                and FLAG.search(node.value)
            ):
                offenders.append(f"{name}:{node.lineno}: {node.value!r}")
    assert offenders == []


def test_no_import_circles() -> None:
    graph: dict[str, set[str]] = {}
    all_modules = {name: (path, tree) for name, path, tree in modules()}
    for name, (path, tree) in all_modules.items():
        graph[name] = {i for i in _imports(name, path, tree) if i in all_modules and i != name} - {
            p for p in all_modules if name.startswith(p + ".")
        }  # a module's own packages
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycles.append(" -> ".join([*stack[stack.index(dep) :], dep]))
            elif dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert cycles == []


@pytest.mark.parametrize("kind", ["module", "function"])
def test_pieces_stay_small(kind: str) -> None:
    offenders = []
    for name, path, tree in modules():
        if kind == "module":
            n = len(path.read_text().splitlines())
            if n > MAX_MODULE_LINES:
                offenders.append(f"{name}: {n} lines")
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    offenders.append(f"{name}.{node.name}: {n} lines")
    assert offenders == []
