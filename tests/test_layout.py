"""The package layout is the architecture (docs/architecture.md): no import cycle, no upward import.

The import graph is read from the source with ``ast``, nothing is imported. Both module-level and
function-level imports count: a function-level import is a dependency all the same (it only runs later),
and a cycle hidden inside a function is still two modules that cannot be understood, tested or moved
one without the other. Imports under ``if TYPE_CHECKING:`` do not count: they never run, and an
annotation may name a type from anywhere. The package root ``nbflow/__init__.py`` is the public face
(``nbflow.record``, ``nbflow.dashboard``, ``%load_ext nbflow``): it belongs to the surfaces, and no module
of a lower layer may import from it (``nbflow.version`` holds the version for them).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "nbflow"

# Lowest first: a module may import its own layer (without a cycle) and the layers below it, never above.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("nbflow.errors", "nbflow.checks", "nbflow.settings", "nbflow.record", "nbflow.version")),
    ("store", ("nbflow.store",)),
    ("core", ("nbflow.core",)),
    ("execution", ("nbflow.execution",)),
    ("services", ("nbflow.services",)),
    ("surfaces", ("nbflow.api", "nbflow.cli", "nbflow.jupyter", "nbflow.mcp", "nbflow.client", "nbflow")),
]


def _modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


def _runtime_imports(tree: ast.AST) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    found: list[ast.Import | ast.ImportFrom] = []
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        stack.extend(ast.iter_child_nodes(node))
    return found


def import_graph() -> dict[str, set[str]]:
    """Module -> the nbflow modules it imports (``from nbflow.x import y`` is an edge to ``nbflow.x.y`` if
    that is a module, else to ``nbflow.x``)."""
    modules = _modules()

    def known(name: str) -> str:
        while name not in modules:
            name = name.rpartition(".")[0]
        return name

    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = graph.setdefault(name, set())
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*parts, base] if base else parts)
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                if target == "nbflow" or target.startswith("nbflow."):
                    target = known(target)
                    if target != name:
                        edges.add(target)
    return graph


def layer_of(module: str) -> int:
    best, rank = "", -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > len(best):
                best, rank = prefix, i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS"
    return rank


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path, or None (an iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    for root in sorted(graph):
        if root in state:
            continue
        path: list[str] = []
        stack: list[tuple[str, list[str]]] = [(root, sorted(graph[root]))]
        state[root] = 1
        path.append(root)
        while stack:
            node, todo = stack[-1]
            if not todo:
                stack.pop()
                path.pop()
                state[node] = 2
                continue
            nxt = todo.pop()
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                stack.append((nxt, sorted(graph.get(nxt, ()))))
    return None


def test_the_graph_is_read() -> None:
    """Guards the guard: the edges it must see are seen (a module-level, a function-level, a relative
    import), and none under TYPE_CHECKING."""
    graph = import_graph()
    assert "nbflow.store" in graph["nbflow.core.states"]  # ``from nbflow.store import Store``
    assert "nbflow.execution.execute" in graph["nbflow.execution.runprocess"]  # inside a function
    assert "nbflow.core.concurrency" in graph["nbflow.core.workers"]  # inside a function
    assert "nbflow.store.database" not in graph["nbflow.store.retry"]  # only under TYPE_CHECKING
    assert len(graph) > 60 and sum(map(len, graph.values())) > 200


def test_no_import_cycle() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def upward_edges(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
                  for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a))


def test_no_upward_import() -> None:
    upward = upward_edges(import_graph())
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(upward)


def test_every_package_says_what_it_may_import() -> None:
    for package in ("store", "core", "execution", "services", "api", "cli", "jupyter", "mcp"):
        doc = ast.get_docstring(ast.parse((PACKAGE / package / "__init__.py").read_text()))
        assert doc, f"nbflow/{package}/__init__.py has no docstring"


@pytest.mark.parametrize(("graph", "cycle"), [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b", "c"}, "b": {"c"}, "c": set()}, None),
    ({"a": {"a"}}, ["a", "a"]),
])
def test_find_cycle(graph: dict[str, set[str]], cycle: list[str] | None) -> None:
    assert find_cycle(graph) == cycle


def test_an_upward_edge_is_told() -> None:
    """The layer check on a graph with one edge each way: only the upward one is reported."""
    graph = {"nbflow.core.flows": {"nbflow.execution.containment", "nbflow.store.models"},
             "nbflow.services.runner": {"nbflow.execution.launcher"}, "nbflow.store.retry": {"nbflow.cli"}}
    assert upward_edges(graph) == ["nbflow.core.flows (core) -> nbflow.execution.containment (execution)",
                                   "nbflow.store.retry (store) -> nbflow.cli (surfaces)"]
    assert layer_of("nbflow") == layer_of("nbflow.jupyter.widgets.badges") == len(LAYERS) - 1
