"""No import circles inside ``lib_merge``: a feature's modules form layers (the core below the
WebUI glue; in the glue, ``hosts`` below ``board`` and ``guidance``), so each can be read and
tested from the bottom up. The graph counts every import, lazy ones inside functions too, and
leaves out only ``if TYPE_CHECKING:`` blocks (never run). The one loop allowed is the method
registry's self-registration: ``registry`` imports ``builtin`` lazily, whose modules register
themselves into the registry."""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lib_merge"
ALLOWED = {("lib_merge.methods.registry", "lib_merge.methods.builtin")}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:``."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                stack.extend(child.orelse)
                continue
            stack.append(child)


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in _runtime_nodes(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    full = f"{target}.{alias.name}"
                    if full in modules:
                        graph[name].add(full)
                    elif target in modules:
                        graph[name].add(target)
            elif isinstance(node, ast.Import):
                graph[name].update(alias.name for alias in node.names if alias.name in modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_circles_but_the_registrys():
    graph = import_graph()
    for source, target in ALLOWED:
        assert target in graph[source], f"the allowed loop is gone: update ALLOWED ({source} -> {target})"
        graph[source].discard(target)
    assert cycles(graph) == []


def test_the_check_finds_a_circle():
    """Guard against a vacuous pass: the real graph with the registry loop left in has one."""
    assert any("lib_merge.methods.registry" in c for c in cycles(import_graph()))


def test_layers_of_the_webui_glue():
    graph = import_graph()
    for name, targets in graph.items():
        if not name.startswith("lib_merge.webui"):
            assert not {t for t in targets if t.startswith("lib_merge.webui")} - {"lib_merge.webui.board.standalone",
                                                                                   "lib_merge.webui.board.host_a1111"}, name
        if name.startswith("lib_merge.webui.hosts"):
            assert not any(t.startswith(("lib_merge.webui.board", "lib_merge.webui.guidance")) for t in targets), name
        if name.startswith("lib_merge.webui.board"):
            assert not any(t.startswith("lib_merge.webui.guidance") for t in targets), name
        if name.startswith("lib_merge.webui.guidance"):
            assert not any(t.startswith("lib_merge.webui.board") for t in targets), name
