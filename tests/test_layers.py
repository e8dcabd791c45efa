"""infermill's modules in layers, and the check that every import goes down them, with no cycle.

The layers are listed bottom first. A module may import from its own layer and the layers
below it, never from one above; no chain of imports comes back to where it started. Every
import counts: at module level, in a function (an import put off to dodge a cycle is still
one), under ``TYPE_CHECKING``, and ``importlib.import_module`` of a literal name.

A new module goes in the table below; a pattern ``name.*`` stands for a package and everything
in it.
"""

from __future__ import annotations

import ast
import fnmatch
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import infermill

#: bottom first: (what the layer is, the modules in it, without the leading ``infermill.``)
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    (
        "foundation",
        ("errors", "exitcodes", "types", "version", "eventloop", "logs", "metrics", "concurrency", "echo_app"),
    ),
    (
        "configuration",
        ("config", "servertypes", "layout", "gpus", "retry", "cost", "prompts", "structured", "rollouts"),
    ),
    (
        "outside world: files, HTTP, servers",
        ("io.*", "cache", "http1", "client", "servers.*", "datatrove_compat", "jobfile"),
    ),
    (
        "checkpoints: the work queue",
        ("queue_storage", "queue_storage_s3", "mirror", "journal", "queue", "stream", "worker"),
    ),
    ("observability", ("timeseries", "jobstatus", "progress", "monitor", "report", "card")),
    ("engine", ("ordering", "engine")),
    ("runs: lifecycles and the runner", ("lifecycles", "runner")),
    ("executors", ("executors.*",)),
    ("application", ("job", "keys", "application")),
    # the package root ("infermill"): its public names are imported on first use, and its own
    # imports run before any module's (test_package_root_imports_only_the_foundation)
    ("interface", ("cli", "__main__", "")),
]

TABLE = "the layer table (LAYERS in tests/test_layers.py)"


@dataclass(frozen=True)
class Import:
    """One import of a module of the package by another: where, and of what."""

    module: str
    target: str
    path: Path
    line: int
    at_module_level: bool  # run on import: not in a function, not under TYPE_CHECKING

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.module} imports {self.target}"


def modules(root: Path) -> dict[str, Path]:
    """Every module of the package in folder ``root``, by dotted name (a package by its own name)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join([*base, *([node.module] if node.module else [])])


def _imported_names(node: ast.Import | ast.ImportFrom | ast.Call, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom):
        source = _absolute(node, module, is_package)
        return [f"{source}.{alias.name}" for alias in node.names]  # a submodule, or a name in ``source``
    if (
        isinstance(node, ast.Call)
        and isinstance(node.func, (ast.Attribute, ast.Name))
        and (node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id) == "import_module"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    ):
        return [node.args[0].value]
    return []


def _deferred_nodes(tree: ast.Module) -> set[int]:
    """The ids of the nodes that do not run on import: in a function, or under ``TYPE_CHECKING``."""
    deferred: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            deferred.update(id(child) for child in ast.walk(node) if child is not node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):  # its ``else`` runs
            deferred.update(id(child) for statement in node.body for child in ast.walk(statement))
    return deferred


def imports(found: dict[str, Path]) -> Iterator[Import]:
    """Every import of one module of ``found`` by another (each imported module once per statement)."""
    for module, path in found.items():
        tree = ast.parse(path.read_text(), str(path))
        deferred = _deferred_nodes(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom, ast.Call)):
                continue
            targets = set()
            for name in _imported_names(node, module, path.name == "__init__.py"):
                while name and name not in found:  # a name in a module: the module
                    name = name.rpartition(".")[0]
                if name and name != module:
                    targets.add(name)
            for target in sorted(targets):
                yield Import(module, target, path, node.lineno, id(node) not in deferred)


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` of the layer that holds ``module``; None if none does."""
    for index, (_, members) in enumerate(LAYERS):
        if any(_matches(module, entry) for entry in members):
            return index
    return None


def _matches(module: str, entry: str) -> bool:
    """Whether the table's ``entry`` stands for ``module`` (``infermill.io.readers``: ``io.*``)."""
    name = module.partition(".")[2]
    return name == entry or (entry.endswith(".*") and (name == entry[:-2] or fnmatch.fnmatchcase(name, entry)))


def unplaced(found: dict[str, Path]) -> list[str]:
    """A line for each module in no layer."""
    missing = [(module, path) for module, path in found.items() if layer_of(module) is None]
    return [f"{path}: {module} is in no layer: add it to {TABLE}" for module, path in missing]


def stale(found: dict[str, Path]) -> list[str]:
    """A line for each entry of the table that names no module."""
    return [
        f"{entry or '(the package root)'} (layer {name!r}) names no module: remove it from {TABLE}"
        for name, members in LAYERS
        for entry in members
        if not any(_matches(module, entry) for module in found)
    ]


def upward(found: dict[str, Path]) -> list[str]:
    """A line for each import of a module from a layer above the importer's."""
    problems = []
    for imp in imports(found):
        mine, theirs = layer_of(imp.module), layer_of(imp.target)
        if mine is not None and theirs is not None and theirs > mine:
            problems.append(
                f"{imp}, of layer {LAYERS[theirs][0]!r}, above its own {LAYERS[mine][0]!r}: move what it needs "
                f"down, or the module to another layer of {TABLE}"
            )
    return problems


def cycles(found: dict[str, Path]) -> list[str]:
    """A line for each cycle of imports, naming every import on it."""
    graph: dict[str, dict[str, Import]] = {module: {} for module in found}
    for imp in imports(found):
        graph[imp.module].setdefault(imp.target, imp)
    problems: list[str] = []
    state: dict[str, str] = {}  # "open" while on the path, "done" once every path from it is seen
    path: list[Import] = []

    def visit(module: str) -> None:
        state[module] = "open"
        for target, imp in graph[module].items():
            path.append(imp)
            if state.get(target) == "open":
                start = next(i for i, step in enumerate(path) if step.module == target)
                problems.append("import cycle:\n" + "\n".join(f"  {step}" for step in path[start:]))
            elif target not in state:
                visit(target)
            path.pop()
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module)
    return problems


def root_imports(found: dict[str, Path], root: str) -> list[str]:
    """A line for each module-level import of the package root ``root`` from above the bottom
    layer: Python runs the root before any module of the package, so what it imports on import
    is imported by every module."""
    return [
        f"{imp}: the package root is imported before any module; import it on first use (see _LAZY)"
        for imp in imports(found)
        if imp.module == root and imp.at_module_level and layer_of(imp.target) != 0
    ]


PACKAGE = Path(infermill.__file__).parent
FOUND = modules(PACKAGE)


def test_every_module_has_a_layer() -> None:
    assert not unplaced(FOUND), "\n".join(unplaced(FOUND))


def test_every_entry_of_the_table_names_a_module() -> None:
    assert not stale(FOUND), "\n".join(stale(FOUND))


def test_no_import_goes_up_the_layers() -> None:
    assert not upward(FOUND), "\n".join(upward(FOUND))


def test_no_import_cycle() -> None:
    assert not cycles(FOUND), "\n".join(cycles(FOUND))


def test_package_root_imports_only_the_foundation() -> None:
    assert not root_imports(FOUND, "infermill"), "\n".join(root_imports(FOUND, "infermill"))


def test_the_check_names_each_bad_import(tmp_path: Path) -> None:
    """The checks above on a package of their own: a cycle through a function-level import, an
    import up the layers under TYPE_CHECKING, a module in no layer and the root importing above
    the bottom layer are each named, with the file and line of the import."""
    package = tmp_path / "infermill"
    (package / "io").mkdir(parents=True)
    files = {
        "__init__.py": "from infermill.config import X\n",
        "errors.py": "",
        "config.py": "def f():\n    from . import client\n",
        "client.py": "from infermill.config import X\nfrom infermill.errors import E\n",
        "io/__init__.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from infermill.runner import R\n",
        "runner.py": "import importlib\nimportlib.import_module('infermill.io')\n",
        "stray.py": "",
    }
    for name, text in files.items():
        (package / name).write_text(text)
    found = modules(package)
    assert set(found) == {
        "infermill", "infermill.errors", "infermill.config", "infermill.client", "infermill.io", "infermill.runner",
        "infermill.stray",
    }  # fmt: skip

    assert unplaced(found) == [f"{package}/stray.py: infermill.stray is in no layer: add it to {TABLE}"]
    assert f"types (layer 'foundation') names no module: remove it from {TABLE}" in stale(found)
    up = upward(found)
    assert len(up) == 2, up
    assert up[0].startswith(f"{package}/config.py:2: infermill.config imports infermill.client, of layer 'outside")
    assert up[1].startswith(f"{package}/io/__init__.py:3: infermill.io imports infermill.runner, of layer 'runs")
    assert cycles(found) == [
        f"import cycle:\n  {package}/config.py:2: infermill.config imports infermill.client\n"
        f"  {package}/client.py:1: infermill.client imports infermill.config",
        f"import cycle:\n  {package}/io/__init__.py:3: infermill.io imports infermill.runner\n"
        f"  {package}/runner.py:2: infermill.runner imports infermill.io",
    ]
    assert root_imports(found, "infermill") == [
        f"{package}/__init__.py:1: infermill imports infermill.config: the package root is imported before any "
        "module; import it on first use (see _LAZY)"
    ]
