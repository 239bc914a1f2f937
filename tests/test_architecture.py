"""The shape of the package, checked: no import cycles (lazy imports included), SQL and duckdb only in the
store, no file over 400 lines, CLI functions short, and a public API whose names never turn into modules."""

from __future__ import annotations

import ast
import importlib
import inspect
import pkgutil
import types
from pathlib import Path

import pytest

import hctembed

PACKAGE = Path(hctembed.__file__).parent
STORE_PACKAGE = PACKAGE / "index" / "store"
MAX_LINES = 400
MAX_CLI_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, tuple[Path, ast.Module]]:
    return {_module_name(p): (p, ast.parse(p.read_text(), str(p))) for p in sorted(PACKAGE.rglob("*.py"))}


def _resolve(module: str, *, is_package: bool, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def import_graph() -> dict[str, set[str]]:
    """Every hctembed module -> the hctembed modules it imports anywhere (top level or inside functions)."""
    sources = _sources()
    graph: dict[str, set[str]] = {name: set() for name in sources}
    for name, (path, tree) in sources.items():
        is_package = path.name == "__init__.py"
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
            for inner in ast.walk(node)
        }  # imports under `if TYPE_CHECKING:` never run
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package=is_package, node=node)
                # `from pkg import sub` names the submodule when there is one
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in sources else base for a in node.names]
            for target in targets:
                if target.startswith("hctembed") and target in sources and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_no_import_cycle_lazy_imports_included() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_file_over_400_lines() -> None:
    long = {
        str(p.relative_to(PACKAGE)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


# the locator (where each scan's files lie) is a tiny SQLite file kept with the io layer that writes its entries
LOCATOR_MODULE = PACKAGE / "io" / "locator.py"


def _outside_store(path: Path) -> bool:
    return STORE_PACKAGE not in path.parents and path != LOCATOR_MODULE


def _imports_duckdb(node: ast.AST) -> bool:
    if isinstance(node, ast.Import):
        return any(a.name.split(".")[0] == "duckdb" for a in node.names)
    return isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "duckdb"


def test_duckdb_and_sql_only_in_the_store_and_the_locator_file() -> None:
    offenders = []
    for name, (path, tree) in _sources().items():
        if not _outside_store(path):
            continue
        for node in ast.walk(tree):
            if _imports_duckdb(node):
                offenders.append(f"{name}:{node.lineno} imports duckdb")
            elif isinstance(node, ast.Attribute) and node.attr in ("con", "execute", "sql", "executemany"):
                offenders.append(f"{name}:{node.lineno} uses .{node.attr}")
    assert not offenders, "SQL outside the store package:\n" + "\n".join(offenders)


def test_cli_functions_are_short() -> None:
    long = []
    for path in sorted((PACKAGE / "cli").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef):
                # the body only: a typer command's option list is its signature, not logic
                body_lines = node.body[-1].end_lineno - node.body[0].lineno + 1
                if body_lines > MAX_CLI_FUNCTION_LINES:
                    long.append(f"{path.name}:{node.name} ({body_lines} lines)")
    assert not long, f"CLI functions over {MAX_CLI_FUNCTION_LINES} lines: {long}"


def _all_modules() -> list[str]:
    return sorted(m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="hctembed."))


@pytest.mark.parametrize("first", ["hctembed.embedding.run", "everything"])
def test_public_names_stay_the_documented_objects(first: str) -> None:
    """Importing submodules (any, all) never turns a public name such as ``hctembed.preprocess`` into a module."""
    modules = _all_modules() if first == "everything" else [first]
    for name in modules:
        if name.startswith("hctembed.cli"):
            continue  # the CLI is a front end, not part of the import-anything contract (typer)
        importlib.import_module(name)
    for name in hctembed.__all__:
        value = getattr(hctembed, name)
        assert not isinstance(value, types.ModuleType), f"hctembed.{name} is a module after importing {first}"
        assert callable(value) or inspect.isclass(value), f"hctembed.{name} is {value!r}"
    assert callable(hctembed.preprocess)


# what the io layer (files, archives, PACS) may build on: nothing that stores, indexes, embeds or serves
IO_MAY_IMPORT = ("hctembed.io", "hctembed.errors", "hctembed.volume", "hctembed.rescale", "hctembed.portable_paths",
                 "hctembed.head_check", "hctembed.config")  # fmt: skip


def test_io_imports_nothing_above_it() -> None:
    graph = import_graph()
    upward = sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name.startswith("hctembed.io.")
        for target in targets
        if not any(target == ok or target.startswith(ok + ".") for ok in IO_MAY_IMPORT)
    )
    assert not upward, "io imports from above it:\n" + "\n".join(upward)
