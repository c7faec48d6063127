"""autotp's modules import each other in one direction: the graph built from the source (every import, the lazy
ones inside functions included) has no cycle, and autotp never imports the kernel package at module level."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "autotp"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: pathlib.Path, name: str) -> set[str]:
    """autotp modules that `path` imports anywhere (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # `from . import comm` imports the submodule; `from .config import X` imports config (X may be a module)
            names = [f"{target}.{alias.name}" for alias in node.names]
            candidates = names if node.module is None else [target] + names
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found.update(c for c in candidates if c == "autotp" or c.startswith("autotp."))
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        # `from . import comm` names a module; `from .config import X` names config: keep only real modules.
        graph[name] = {m for m in _imports(path, name) if m in modules and m != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str]:
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for child in sorted(graph[node]):
            if state.get(child) == "open":
                return stack[stack.index(child):] + [child]
            if child not in state:
                found = visit(child)
                if found:
                    return found
        state[node] = "done"
        stack.pop()
        return []

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return []


def test_autotp_import_graph_has_no_cycle():
    graph = _graph()
    # The package's __init__ re-exports from its modules; edges into it from a submodule would be cycles too.
    assert _cycle(graph) == [], " -> ".join(_cycle(graph))


def test_graph_sees_lazy_imports():
    """The check must see imports inside functions, where a cycle is usually hidden."""
    graph = _graph()
    assert "autotp._ext" in graph["autotp.zero.backend"]
