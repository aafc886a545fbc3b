"""The code's structure: no import circle; exporters and runtimes never import each other; the core reaches them
only through the registries (entry points). Imports are read with ast, inside functions too."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stata_deploy", "exporters", "runtimes")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            parts = p.relative_to(ROOT).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in mods.items():
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                cands = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = pkg[: len(pkg) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                cands = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {c for c in cands if c in mods and c != name and not name.startswith(c + ".")}
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out = {}, {}, [], set(), []

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
    assert _cycles(_imports(_modules())) == []


def test_dependencies_point_one_way():
    graph = _imports(_modules())
    bad = [(a, b) for a, deps in graph.items() for b in deps
           if (a.split(".")[0], b.split(".")[0]) in {("exporters", "runtimes"), ("runtimes", "exporters"),
                                                      ("stata_deploy", "exporters"), ("stata_deploy", "runtimes")}]
    assert bad == []
