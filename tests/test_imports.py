"""The arrows between modules point one way: read from the source (every import, also those inside
functions), so a cycle hidden behind a lazy import fails here too.

- no import cycle inside ``hf_varlen_patch/``;
- the runtime never imports the harness (``testing``, ``coverage``, ``cli``) nor test data
  (``equivalence``, ``samples``); only ``selfcheck``, which ``apply`` runs on unregistered types,
  uses ``equivalence``;
- ``context`` depends on ``boundaries`` alone; ``equivalence`` on no patching machinery;
- ``patches/`` -> engine: the engine never imports a family module (the registry loads the
  ``patches`` package, which registers every family).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE, PATCHES = ROOT / "hf_varlen_patch", ROOT / "patches"
PACKAGE = "hf_varlen_patch"

HARNESS = {"testing", "coverage", "coverage_doc", "cli"}
TEST_DATA = {"equivalence", "samples"}
#: What ``equivalence`` must not reach: it compares models, it does not patch them.
PATCHING_MACHINERY = {"api", "install", "patching", "registry", "context", "selfcheck", *HARNESS}
#: ``context`` sits under everything that reads boundaries.
CONTEXT_MAY_IMPORT = {"boundaries", "errors"}


def _module_name(path: Path, root: Path, prefix: str) -> str:
    parts = [*prefix.split("."), *path.relative_to(root).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(p, ENGINE, PACKAGE): p for p in ENGINE.rglob("*.py")}
    found.update({_module_name(p, PATCHES, f"{PACKAGE}.patches"): p for p in PATCHES.rglob("*.py")})
    return found


MODULES = _modules()


def _imports(name: str) -> set[str]:
    """Every module of this project that ``name`` imports, anywhere in its source."""
    path = MODULES[name]
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            targets = [f"{module}.{alias.name}" for alias in node.names] + [module]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


GRAPH = {name: _imports(name) for name in MODULES}


def _short(name: str) -> str:
    return name.removeprefix(f"{PACKAGE}.")


def _engine(name: str) -> bool:
    return name != PACKAGE and not name.startswith(f"{PACKAGE}.patches")


def _cycles(nodes: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in GRAPH[node] & nodes:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(_short(m) for m in component))

    for node in sorted(nodes):
        if node not in index:
            visit(node)
    return found


def test_the_graph_is_read():
    assert {"api", "install", "context", "patching", "registry", "testing"} <= {_short(m) for m in GRAPH}
    assert f"{PACKAGE}.context" in GRAPH[f"{PACKAGE}.patching"]
    assert f"{PACKAGE}.patches.multimodal" in MODULES


def test_no_import_cycle_inside_the_engine():
    assert _cycles({m for m in GRAPH if _engine(m)}) == []


def test_the_engine_never_imports_a_family():
    offenders = {
        _short(m): sorted(_short(t) for t in targets if t.startswith(f"{PACKAGE}.patches."))
        for m, targets in GRAPH.items()
        if _engine(m)
    }
    assert {m: t for m, t in offenders.items() if t} == {}


@pytest.mark.parametrize("module", sorted(_short(m) for m in MODULES if _short(m) not in HARNESS | TEST_DATA))
def test_the_runtime_never_imports_the_harness(module):
    forbidden = HARNESS | (set() if module == "selfcheck" else TEST_DATA)
    name = PACKAGE if module == PACKAGE else f"{PACKAGE}.{module}"
    assert sorted(_short(t) for t in GRAPH[name] if _short(t) in forbidden) == []


def test_context_depends_on_boundaries_only():
    assert {_short(t) for t in GRAPH[f"{PACKAGE}.context"]} <= CONTEXT_MAY_IMPORT


def test_equivalence_is_a_leaf():
    assert {_short(t) for t in GRAPH[f"{PACKAGE}.equivalence"]} & PATCHING_MACHINERY == set()
