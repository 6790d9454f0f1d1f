"""The house's arrows point one way: this test fails when a forbidden import appears.

Layers, lowest first (docs/architecture.md)::

    fedlens.shared  <-  fedlens.client, fedlens.server  <-  fedlens.simulations  <-  fedlens.ops

Every import counts, also one inside a function: a function-local import hides a
cycle from Python's start-up, not from the design.
"""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Repository folder -> the sub-package of `fedlens` it installs as.
PACKAGES = {
    "shared": "fedlens.shared",
    "client": "fedlens.client",
    "server": "fedlens.server",
    "simulations": "fedlens.simulations",
    "ops": "fedlens.ops",
}
# Which packages each one may import (itself included).
ALLOWED = {
    "fedlens.shared": {"fedlens.shared"},
    "fedlens.client": {"fedlens.shared", "fedlens.client"},
    "fedlens.server": {"fedlens.shared", "fedlens.server"},
    "fedlens.simulations": {"fedlens.shared", "fedlens.client", "fedlens.server", "fedlens.simulations"},
    "fedlens.ops": {"fedlens.shared", "fedlens.client", "fedlens.server", "fedlens.simulations", "fedlens.ops"},
}
# The config is a leaf: it may import only the error types.
LEAVES = {"fedlens.shared.config": {"fedlens.shared.errors"}, "fedlens.shared.errors": set()}
# Third-party packages the ML core must not depend on (Flower, and the HTTP service's stack).
NOT_IN_CORE = ("flwr", "ray", "fastapi", "starlette", "uvicorn", "prometheus_client")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in PACKAGES:
        parts = [*PACKAGES[parts[0]].split("."), *parts[1:]]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    out = {}
    for folder in (*PACKAGES, "tests", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            out[_module_name(path)] = path
    return out


SOURCES = _sources()


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports (absolute names), function-local imports included."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            for alias in node.names:  # `from pkg import module` imports that module
                if f"{target}.{alias.name}" in SOURCES:
                    out.add(f"{target}.{alias.name}")
    # Importing `a.b.c` runs `a/__init__` and `a/b/__init__` first (except packages this module is inside).
    for target in list(out):
        parts = target.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent in SOURCES and not (name == parent or name.startswith(parent + ".")):
                out.add(parent)
    return out


GRAPH = {name: _imports(name, path) for name, path in SOURCES.items()}


def _layer(module: str) -> str | None:
    for pkg in ALLOWED:
        if module == pkg or module.startswith(pkg + "."):
            return pkg
    return None


def test_the_source_tree_is_what_the_test_reads():
    assert "fedlens.shared.config" in GRAPH and "fedlens.ops.cli" in GRAPH and "fedlens.client.app" in GRAPH
    assert len(GRAPH) > 60


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if _layer(m)))
def test_packages_import_only_downwards(module):
    own = _layer(module)
    bad = sorted(t for t in GRAPH[module] if (layer := _layer(t)) and layer not in ALLOWED[own])
    assert not bad, f"{module} ({own}) must not import {bad}: see docs/architecture.md for which layer may import which"
    foreign = sorted(
        t for t in GRAPH[module] if t.split(".")[0] in ("tests", "benchmarks", "shared", "client", "server", "simulations", "ops")
    )
    assert not foreign, f"{module} imports {foreign}: import fedlens.<package>, never tests, benchmarks or bare top-level names"
    if own == "fedlens.shared":
        flower = sorted(t for t in GRAPH[module] if t.split(".")[0] in NOT_IN_CORE)
        assert not flower, f"{module} is in the ML core and must not import {flower} (Flower and the HTTP service stay in the layers above)"


def test_nothing_imports_tests():
    users = sorted(m for m, targets in GRAPH.items() if not m.startswith("tests") and any(t.split(".")[0] == "tests" for t in targets))
    assert not users, f"{users} import from tests/"


@pytest.mark.parametrize("leaf", sorted(LEAVES))
def test_leaves_import_nothing_else_from_fedlens(leaf):
    ours = {t for t in GRAPH[leaf] if t.startswith("fedlens.")}
    assert ours <= LEAVES[leaf], f"{leaf} is a leaf but imports {sorted(ours - LEAVES[leaf])}"


def test_no_import_cycles():
    """No module reaches itself through imports (package ``__init__`` files count as modules)."""
    ours = {m: {t for t in targets if t in GRAPH and t != m} for m, targets in GRAPH.items() if _layer(m)}
    # A package's __init__ re-exporting its own submodules is how packages are built, not a cycle.
    edges = {m: {t for t in targets if not (m.startswith(t + ".") and SOURCES[t].name == "__init__.py")} for m, targets in ours.items()}
    cycles = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(edges.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_every_package_folder_is_installed():
    """pyproject lists packages explicitly (the folders map into `fedlens`): a new folder must be added."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    listed = set(tool["packages"])
    found = {_module_name(p.parent / "__init__.py") for folder in PACKAGES for p in (REPO / folder).rglob("__init__.py")}
    assert found == listed, (
        f"pyproject.toml [tool.setuptools] packages differs from the package folders: missing {sorted(found - listed)}, stale {sorted(listed - found)}"
    )
    assert tool["package-dir"] == {pkg: folder for folder, pkg in PACKAGES.items()}
