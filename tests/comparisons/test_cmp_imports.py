"""The comparisons package has no import circles, counting imports inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

import comparisons

PKG = Path(comparisons.__file__).parent


def _internal_imports(path: Path) -> set:
    """Names of the comparisons modules that ``path`` imports anywhere in its body."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 and node.module:
                out.add(node.module.split(".")[0])
            elif node.level == 1:  # from . import plots
                out.update(a.name for a in node.names)
            elif node.level == 0 and node.module and node.module.split(".")[0] == "comparisons":
                parts = node.module.split(".")
                out.update([parts[1]] if len(parts) > 1 else [a.name for a in node.names])
        elif isinstance(node, ast.Import):
            for a in node.names:
                parts = a.name.split(".")
                if parts[0] == "comparisons" and len(parts) > 1:
                    out.add(parts[1])
    return out


def _graph() -> dict:
    mods = {p.stem: p for p in PKG.glob("*.py")}
    # the package __init__ and __main__ sit on top: they import modules, nothing imports them
    return {name: _internal_imports(p) & set(mods) - {"__init__", "__main__"} for name, p in mods.items()}


def _cycle(graph: dict):
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        state[n] = "done"
        stack.pop()
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_the_import_graph_is_acyclic():
    graph = _graph()
    assert {"report", "mirman_report", "theorem", "theorem_report", "tables", "run"} <= set(graph)
    assert "theorem" in graph["__init__"]  # the parser sees relative imports
    cycle = _cycle(graph)
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
