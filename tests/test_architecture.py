"""The package's shape, as docs/design.md §4 draws it: no import cycles, small modules, no private
names crossing modules, no citation of a file outside the repository.

Every import counts, wherever it is written: at the top, inside a function, under TYPE_CHECKING.
(`lint-imports`, run by CI, checks the layers themselves; this file checks what a layer contract
cannot.) The checks read the source with ``ast``: nothing is imported.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "posthoc_cli"
MAX_MODULE_LINES = 400
MAX_CLASS_LINES = 250


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name → file, for every module of the package at ``root`` (``__init__`` names its package)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, str, int]]:
    """``(imported module, imported name, line)`` for every import of a package module in ``path``.

    ``from .pkg import sub`` imports the submodule ``sub`` when there is one, else a name of ``pkg``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    root = name.partition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.partition(".")[0] == root:
                    yield alias.name, "", node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.partition(".")[0] != root:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                yield (sub, "", node.lineno) if sub in known else (target, alias.name, node.lineno)


def graph(root: Path) -> dict[str, set[str]]:
    """Module → the package modules it imports."""
    known = modules(root)
    return {name: {target for target, _, _ in imports(name, path, known) if target != name} for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted list."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges.get(v, ()):
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_between_modules():
    assert cycles(graph(PACKAGE)) == []


def test_the_cycle_check_finds_a_cycle_through_a_function_level_import(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text('"""docstring only"""\n')
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .c import X\n")
    (pkg / "sub" / "c.py").write_text("def f():\n    from ..a import g\n")
    assert cycles(graph(pkg)) == [["pkg.a", "pkg.sub.b", "pkg.sub.c"]]


@pytest.mark.parametrize("name", sorted(modules(PACKAGE)))
def test_modules_and_classes_stay_small(name):
    path = modules(PACKAGE)[name]
    source = path.read_text()
    assert len(source.splitlines()) <= MAX_MODULE_LINES, f"{path} has over {MAX_MODULE_LINES} lines: split it by idea"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            size = (node.end_lineno or node.lineno) - node.lineno + 1
            assert size <= MAX_CLASS_LINES, f"class {node.name} in {path} has {size} lines (at most {MAX_CLASS_LINES})"


def test_no_private_name_is_imported_from_another_module():
    """A ``_name`` is its module's own; a ``_module`` is its package's own (``_version`` is everyone's)."""
    known = modules(PACKAGE)

    def private(name: str, target: str, imported: str) -> bool:
        if imported.startswith("_") and imported != "__version__":
            return True
        package, _, leaf = target.rpartition(".")
        return leaf.startswith("_") and leaf != "_version" and package != name.rpartition(".")[0]

    crossing = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {target} {imported}".rstrip()
        for name, path in known.items()
        for target, imported, line in imports(name, path, known)
        if private(name, target, imported)
    ]
    assert crossing == []


def test_the_code_cites_only_files_of_this_repository():
    # The design lives in docs/design.md; a path outside the repository means nothing to a reader of it.
    citing = [str(p) for p in PACKAGE.rglob("*.py") if "DESIGN" in p.read_text()]
    assert citing == []
    assert (PACKAGE.parent / "docs" / "design.md").is_file()
