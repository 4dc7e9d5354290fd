"""The package layering, checked on the source: no import cycles, and no forbidden edges.

Every `import` and `from ... import` counts, wherever it stands (module top, inside a
function, under `if TYPE_CHECKING:`): a function-level import is how a cycle usually hides,
and it still runs the other module the first time that function is called. Only imports by
string (`importlib.import_module(name)`, as edge_node.accel.registry does) are invisible
here, which is what such a registry is for.

Layers (DESIGN.md): `common` is the base everything shares; `edge_node` (the node) and
`server` (broker and Flower server) both build on it but never on each other; `sims`
(simulation, benchmarks, the CLI) sits on top of all of them and nothing but `sims` and the
tests imports it; `protos` is generated code and imports only itself.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "edge_node", "server", "sims", "protos")

# package -> the packages of ours it must not import
FORBIDDEN: dict[str, set[str]] = {
    "common": {"edge_node", "server", "sims", "protos"},
    "edge_node": {"server", "sims"},
    "server": {"edge_node", "sims"},
    "protos": {"common", "edge_node", "server", "sims"},
}


@dataclass(frozen=True)
class Edge:
    """One import statement of module `source` that names module `target`."""

    source: str
    target: str
    path: str  # relative to the root walked
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


def module_files(root: Path, packages: Iterable[str]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under each package directory."""
    modules = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def import_graph(root: Path, packages: Iterable[str]) -> tuple[list[Edge], list[str]]:
    """Every intra-project import edge (self-imports left out), and the intra-project
    imports that name no module of ours (a stale path the graph would otherwise drop).

    `import a.b` is an edge to module a.b. `from a.b import c` is an edge to module a.b.c
    when that is a module, else to a.b (c is a name defined there); like `import a.b.c`,
    it also runs the `__init__` of a and a.b, but so does every import of a submodule, so
    parent packages are not edges of their own.
    """
    packages = tuple(packages)
    modules = module_files(root, packages)
    edges, unresolved = [], []
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        rel = path.relative_to(root).as_posix()
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if isinstance(node, ast.Import):
                wanted = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # `from ..x import y` in package p.q.r -> p.q.x
                    base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                wanted = [
                    f"{module}.{a.name}" if f"{module}.{a.name}" in modules else module
                    for a in node.names
                ]
            else:
                continue
            for target in dict.fromkeys(wanted):
                if target.split(".")[0] not in packages:
                    continue  # a third-party or standard-library module
                if target not in modules:
                    unresolved.append(f"{rel}:{node.lineno} imports {target}, not a module")
                elif target != name:
                    edges.append(Edge(name, target, rel, node.lineno))
    return edges, unresolved


def find_cycles(edges: Iterable[Edge]) -> list[list[Edge]]:
    """The import cycles, each as its edges: the shortest one through every module that is
    on a cycle (Tarjan's strongly connected components, then a breadth-first search)."""
    graph: dict[str, dict[str, Edge]] = {}
    for e in edges:
        graph.setdefault(e.source, {}).setdefault(e.target, e)
        graph.setdefault(e.target, {})
    # Tarjan, iterative (no recursion limit)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                component = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    component.append(w)
                    if w == v:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    cycles: dict[frozenset, list[Edge]] = {}
    for component in components:
        for start in component:  # the shortest cycle through each module of the tangle
            cycle = _shortest_cycle(graph, set(component), start)
            key = frozenset((e.source, e.target) for e in cycle)
            i = min(range(len(cycle)), key=lambda j: cycle[j].source)
            cycles.setdefault(key, cycle[i:] + cycle[:i])
    return sorted(cycles.values(), key=lambda c: [e.source for e in c])


def _shortest_cycle(graph: dict[str, dict[str, Edge]], members: set[str], start: str) -> list:
    """Breadth first from `start` back to itself, inside one strongly connected component."""
    came_from: dict[str, Edge] = {}
    frontier = [start]
    while start not in came_from:
        nxt = []
        for v in frontier:
            for w, e in sorted(graph[v].items()):
                if w in members and w not in came_from:
                    came_from[w] = e
                    nxt.append(w)
        frontier = nxt
    path, v = [], start
    while True:
        path.append(came_from[v])
        v = came_from[v].source
        if v == start:
            return path[::-1]


def describe_cycle(cycle: list[Edge]) -> str:
    chain = " -> ".join([cycle[0].source] + [e.target for e in cycle])
    steps = "; ".join(f"{e.source} -> {e.target} at {e.where()}" for e in cycle)
    return f"{chain}  ({steps})"


def forbidden_edges(edges: Iterable[Edge]) -> list[str]:
    bad = []
    for e in edges:
        src, dst = e.source.split(".")[0], e.target.split(".")[0]
        if dst in FORBIDDEN.get(src, set()) or (dst == "sims" and src != "sims"):
            bad.append(f"{e.source} imports {e.target} at {e.where()}")
    return bad


@pytest.fixture(scope="module")
def project() -> tuple[list[Edge], list[str]]:
    return import_graph(ROOT, PACKAGES)


def test_the_walk_sees_every_package(project) -> None:
    edges, _ = project
    modules = module_files(ROOT, PACKAGES)
    assert {m.split(".")[0] for m in modules} == set(PACKAGES)
    assert {e.source.split(".")[0] for e in edges} == set(PACKAGES)
    assert len(modules) > 50 and len(edges) > 100


def test_every_import_of_ours_names_a_module_that_exists(project) -> None:
    _, unresolved = project
    assert not unresolved, "\n".join(unresolved)


def test_there_are_no_import_cycles(project) -> None:
    edges, _ = project
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(describe_cycle(c) for c in cycles)


def test_layers_import_only_downwards(project) -> None:
    edges, _ = project
    bad = forbidden_edges(edges)
    assert not bad, "imports across the layers:\n" + "\n".join(bad)


def test_checker_finds_a_cycle_hidden_in_a_function_and_a_forbidden_edge(tmp_path) -> None:
    pkg = tmp_path / "common"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("from . import b  # package imports a submodule\n")
    (pkg / "a.py").write_text("from common.sub import b\n")
    (pkg / "sub" / "b.py").write_text(
        "import os\n\n\ndef later():\n    if os.sep:\n        from .. import a\n    return a\n"
    )
    (pkg / "c.py").write_text("def f():\n    import server.thing\n")  # common -> server
    (pkg / "d.py").write_text("from common.gone import x\n")  # stale path
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "__init__.py").write_text("")
    (tmp_path / "server" / "thing.py").write_text("from common import a\n")

    edges, unresolved = import_graph(tmp_path, ("common", "server"))
    pairs = {(e.source, e.target) for e in edges}
    assert ("common.sub.b", "common.a") in pairs  # relative, two levels, inside a function
    assert ("common.sub", "common.sub.b") in pairs
    assert ("common.a", "common.sub") not in pairs  # `from pkg import sub`: the edge is to sub
    cycles = find_cycles(edges)
    assert [describe_cycle(c).split("  ")[0] for c in cycles] == [
        "common.a -> common.sub.b -> common.a"
    ]
    assert "common/sub/b.py:6" in describe_cycle(cycles[0])
    assert forbidden_edges(edges) == ["common.c imports server.thing at common/c.py:2"]
    assert unresolved == ["common/d.py:1 imports common.gone, not a module"]
