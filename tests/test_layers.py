"""The package's layers (docs/architecture.md): imports point one way, and no module imports itself back.

Every import counts: at the top of a module, inside a function and under ``TYPE_CHECKING`` (a circle through
an import inside a function still means two modules that are really one). The order, from the bottom:

    leaves (choices, errors) <- core <- files / data / runtime <- tasks <- tools <- training <- cli

A module may import its own layer and the layers below it. A task's folder (``tasks/<task>/``) imports no
other task's; the rest of the package reaches a concrete task only through the registry, ``cwkd/tasks/__init__``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import cwkd

#: Each layer's modules, by dotted prefix, from the bottom. The package root (``cwkd``: ``__version__`` and the
#: lazy public names) sits under everything.
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("leaves", ("cwkd.choices", "cwkd.errors")),
    ("core", ("cwkd.core",)),
    ("files/data/runtime", ("cwkd.files", "cwkd.data", "cwkd.runtime")),
    ("tasks", ("cwkd.tasks",)),
    ("tools", ("cwkd.compare", "cwkd.composite", "cwkd.evaluation", "cwkd.export", "cwkd.exportformats",
               "cwkd.hfexport", "cwkd.inspection")),
    ("training", ("cwkd.training",)),
    ("cli", ("cwkd.cli", "cwkd.__main__")),
)
REGISTRY = "tasks"  # tasks/__init__.py: the one module outside a task's folder that names the tasks


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layer_of(module: str, root: str = "cwkd") -> int | None:
    """The index in :data:`LAYERS` of a module (None: the package root, or a module no layer claims)."""
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(_under(module, root + p[len("cwkd"):]) for p in prefixes):
            return index
    return None


def concrete_task(module: str, folders: set[str]) -> str | None:
    """The task folder (``cwkd.tasks.<task>``) that ``module`` lives in, or None: a module beside the registry
    (``tasks/base.py``, ``tasks/bodies.py``), shared by the tasks."""
    parts = module.split(".")
    folder = ".".join(parts[:3])
    return folder if len(parts) >= 3 and parts[1] == REGISTRY and folder in folders else None


def task_folders(edges: dict[str, set[str]], root: str = "cwkd") -> set[str]:
    """The packages under ``tasks/``: one folder per task."""
    return {".".join(m.split(".")[:3]) for m in edges if m.startswith(f"{root}.{REGISTRY}.") and m.count(".") >= 3}


def module_files(package: Path) -> dict[str, Path]:
    """Every module of the package rooted at ``package``, by dotted name."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports anywhere in its file (top level, functions, TYPE_CHECKING)."""
    root = name.split(".")[0]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # ``from pkg import mod`` imports the module pkg.mod; ``from mod import name`` the module mod
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # import a.b.c where a.b.c is an attribute: its module
                target = target.rpartition(".")[0]
            if target and target.split(".")[0] == root and target != name:
                found.add(target)
    return found


def graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports."""
    modules = module_files(package)
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def violations(edges: dict[str, set[str]], root: str = "cwkd") -> list[str]:
    """Every import against the layer order, or between two tasks, or into a task from outside the registry."""
    bad = []
    folders = task_folders(edges, root)
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            if target == root:
                continue  # __version__ and the public names
            low, high = layer_of(target, root), layer_of(source, root)
            if low is None or high is None:
                bad.append(f"{source} -> {target}: a module no layer claims (add it to LAYERS in tests/test_layers.py)")
            elif low > high:
                bad.append(f"{source} ({LAYERS[high][0]}) imports {target} ({LAYERS[low][0]}), a higher layer")
            elif concrete_task(target, folders) and concrete_task(source, folders) != concrete_task(target, folders) \
                    and source != f"{root}.{REGISTRY}":
                mine = concrete_task(source, folders)
                where = f"the task {mine}" if mine else "outside the registry"
                bad.append(f"{source} imports {target} from {where}: go through {root}.{REGISTRY}")
    return bad


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


PACKAGE = Path(cwkd.__file__).parent


def test_no_import_circle() -> None:
    assert cycles(graph(PACKAGE)) == []


def test_imports_follow_the_layers() -> None:
    assert violations(graph(PACKAGE)) == []


def test_every_module_has_a_layer() -> None:
    unclaimed = [m for m in module_files(PACKAGE) if m != "cwkd" and layer_of(m) is None]
    assert unclaimed == []


def _package(tmp_path: Path, files: dict[str, str]) -> Path:
    """A throwaway package named cwkd under ``tmp_path`` (never imported: the test only parses it)."""
    root = tmp_path / "cwkd"
    for rel, text in {"__init__.py": "", **files}.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


FINE = {"errors.py": "", "choices.py": "from cwkd.errors import ConfigError\n",
        "core/__init__.py": "", "core/losses.py": "from cwkd.choices import X\n",
        "tasks/__init__.py": "def get(name):\n    from cwkd.tasks.seg import task\n",
        "tasks/base.py": "from cwkd.core import losses\n",
        "tasks/seg/__init__.py": "", "tasks/seg/task.py": "from cwkd.tasks.base import TaskSpec\nfrom . import data\n",
        "tasks/seg/data.py": "", "tasks/det/__init__.py": "", "tasks/det/task.py": "",
        "training/__init__.py": "", "training/engine.py": "from cwkd.tasks import get\nfrom cwkd import __version__\n"}


def test_a_clean_synthetic_package_passes(tmp_path: Path) -> None:
    edges = graph(_package(tmp_path, FINE))
    assert edges["cwkd.tasks.seg.task"] == {"cwkd.tasks.base", "cwkd.tasks.seg.data"}
    assert violations(edges) == [] and cycles(edges) == []


@pytest.mark.parametrize("path, text, expected", [
    # the core importing the training engine, inside a function
    ("core/losses.py", "def f():\n    from cwkd.training.engine import run\n", "cwkd.core.losses (core) imports"),
    # under TYPE_CHECKING counts too
    ("core/losses.py", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cwkd.tasks.base import T\n",
     "cwkd.core.losses (core) imports cwkd.tasks.base"),
    # a task importing another task
    ("tasks/det/task.py", "from cwkd.tasks.seg.data import load\n", "from the task cwkd.tasks.det"),
    # the engine naming a concrete task instead of asking the registry
    ("training/engine.py", "import cwkd.tasks.seg.task\n", "from outside the registry"),
    # a relative import up the layers
    ("choices.py", "from .core import losses\n", "cwkd.choices (leaves) imports cwkd.core.losses"),
    # a module no layer claims
    ("stray.py", "", None),
])
def test_a_violation_fails(tmp_path: Path, path: str, text: str, expected: str | None) -> None:
    root = _package(tmp_path, {**FINE, path: text})
    found = violations(graph(root))
    if expected is None:
        assert [m for m in module_files(root) if m != "cwkd" and layer_of(m) is None] == ["cwkd.stray"]
    else:
        assert any(expected in line for line in found), found


def test_a_circle_through_a_function_import_fails(tmp_path: Path) -> None:
    root = _package(tmp_path, {**FINE, "errors.py": "def f():\n    from cwkd.choices import X\n"})
    assert cycles(graph(root)) == [["cwkd.choices", "cwkd.errors"]]
