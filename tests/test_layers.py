"""The library's picture stays layered: no module imports a Kedro pipeline, and no imports go round in a circle.

Read from the source with ``ast`` (every import, the ones inside functions and
under ``TYPE_CHECKING`` too), so a lazy import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import PROJECT_ROOT

SOURCE = PROJECT_ROOT / "src"
# Kedro's own wiring: they import the pipelines by design
KEDRO_WIRING = ("muco_flow.pipelines", "muco_flow.pipeline_registry")


def module_name(path: Path) -> str:
    parts = path.relative_to(SOURCE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Each muco_flow module -> the muco_flow modules it imports (``from a import b`` counts b if it is a module)."""
    modules = {module_name(path): path for path in SOURCE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {target for target in targets if target in modules and target != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in sorted(graph.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def package_of(module: str) -> str:
    """``muco_flow.data.ingest`` -> ``muco_flow.data``; a top-level module is its own package."""
    return ".".join(module.split(".")[:2])


def test_the_cycle_finder_finds_a_hand_drawn_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_library_module_imports_a_kedro_pipeline():
    upward = sorted(
        f"{module} -> {target}"
        for module, targets in import_graph().items()
        if not module.startswith(KEDRO_WIRING)
        for target in targets
        if target.startswith("muco_flow.pipelines")
    )
    assert not upward, "the library imports Kedro pipelines:\n" + "\n".join(upward)


def test_no_module_imports_go_round_in_a_circle():
    assert cycles(import_graph()) == []


def test_no_package_imports_go_round_in_a_circle():
    """data, modeling, training, evaluation, registry...: each package depends on the others one way only."""
    packages: dict[str, set[str]] = {}
    for module, targets in import_graph().items():
        packages.setdefault(package_of(module), set()).update(
            package_of(target) for target in targets if package_of(target) != package_of(module)
        )
    packages.pop("muco_flow", None)  # the root package (its __init__ holds the version only)
    assert cycles(packages) == []
