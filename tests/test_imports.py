"""No import cycles between flatrobust's modules (function-level imports included): one idea per module,
each importable on its own. Imports of the package root itself (`from . import __version__`) are left out:
the root only re-exports."""
from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "flatrobust"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        pkg = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            edges |= {t for t in targets if t in mods and t not in (name, "flatrobust")}
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    graph = import_graph()
    assert "flatrobust.trust" in graph["flatrobust.evaluate"]  # function-level and top-level imports are both seen


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()] - seen:
            seen.add(m)
            todo.append(m)
    return seen


def test_layers_the_method_never_imports_evaluation_training_or_the_cli():
    """awp.py, attacks/ and objectives.py (the method) reach none of evaluation, training or the CLI, directly or
    through another module; the library never reaches the CLI."""
    graph = import_graph()
    method = [m for m in graph if m in ("flatrobust.awp", "flatrobust.objectives") or m.startswith("flatrobust.attacks")]
    above = ("flatrobust.evaluate", "flatrobust.trust", "flatrobust.train", "flatrobust.config", "flatrobust.cli")
    for m in method:
        assert not [r for r in _reachable(graph, m) if r.startswith(above)], m
    for m in graph:
        if not m.startswith(("flatrobust.cli", "flatrobust.__main__")):  # the entry point is the CLI
            assert not [r for r in _reachable(graph, m) if r.startswith("flatrobust.cli")], m
