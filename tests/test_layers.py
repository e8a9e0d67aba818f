"""The package's modules form no import cycle (module-level and deferred imports alike), and the
top-level dispatcher, ntk_tracking.cli, is imported by no module below it (its `python -m` entry,
ntk_tracking/cli/__main__.py, aside)."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "ntk_tracking"


def import_graph() -> dict[str, set[str]]:
    """module -> the package's modules it imports (anywhere in its source)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path

    def resolve(name):
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph = {}
    for module, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps |= {resolve(a.name) for a in node.names if a.name.startswith("ntk_tracking")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ntk_tracking"):
                deps |= {resolve(f"{node.module}.{a.name}") for a in node.names}
        graph[module] = deps - {module, None}
    return graph


def cycles(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40
    assert cycles(graph) == []


def test_the_dispatcher_is_imported_by_no_module_of_the_package():
    importers = sorted(m for m, deps in import_graph().items()
                       if "ntk_tracking.cli" in deps and m != "ntk_tracking.cli.__main__")
    assert importers == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
