"""The layout holds: no import cycle inside madapt/ (imports inside functions and under TYPE_CHECKING count),
no module over 600 lines, no function over 80, config imports nothing from training, serving or the store,
and each package's `__init__` says what it holds. Read from the source with `ast`, so nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "madapt"
MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 80
CONFIG_MAY_IMPORT = ("madapt.config", "madapt.errors", "madapt.adapter_types", "madapt.json_grammar")


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, a package named by its `__init__.py`."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = module_files()


def owner(name: str) -> str | None:
    """The module of ours that `name` (a module, or a name inside one) lives in."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str) -> set[str]:
    """Every module of ours that `module` imports, wherever the import statement stands."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {owner(alias.name) for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, *([node.module] if node.module else [])])
            found |= {owner(f"{base}.{alias.name}") for alias in node.names}
    return {name for name in found if name and name != module}


GRAPH = {module: imports_of(module) for module in MODULES}


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for other in GRAPH[node]:
            if other not in index:
                visit(other)
                low[node] = min(low[node], low[other])
            elif other in stack:
                low[node] = min(low[node], index[other])
        if low[node] == index[node]:
            component = []
            while True:
                other = stack.pop()
                component.append(other)
                if other == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in GRAPH:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    assert cycles() == []


def test_the_graph_sees_imports_inside_functions():
    """The cycle check can fail: the CLI imports its commands' modules inside functions."""
    assert {"madapt.api", "madapt.config"} <= GRAPH["madapt.cli"]


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_and_functions_stay_short(module):
    source = MODULES[module].read_text(encoding="utf-8")
    assert source.count("\n") <= MAX_MODULE_LINES
    long = [
        (node.name, node.end_lineno - node.lineno + 1)
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.end_lineno is not None
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert long == []


def test_config_imports_nothing_from_training_serving_or_the_store():
    for module, imported in GRAPH.items():
        if module.startswith("madapt.config"):
            assert all(name.startswith(CONFIG_MAY_IMPORT) for name in imported), (module, imported)


@pytest.mark.parametrize("package", sorted(m for m, p in MODULES.items() if p.name == "__init__.py"))
def test_each_package_says_what_it_holds(package):
    docstring = ast.get_docstring(ast.parse(MODULES[package].read_text(encoding="utf-8")))
    assert docstring and len(docstring.split()) >= 8
