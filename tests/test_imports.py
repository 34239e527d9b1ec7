"""The project's own import graph has no cycles, and the data layer does not depend on stages or models.

The graph is built statically with :mod:`ast` (nothing is imported), from every ``import`` /
``from ... import`` statement in a module, at module level or inside a function: a function-level import
still runs, and a cycle through one only fails later, at the first call. Imports under ``if TYPE_CHECKING:``
never run and are left out.
Only edges between the project's packages count; a package's ``__init__`` is not added as an implicit target
(they are empty here).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("stages", "datamodules", "lightning_modules")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """``{dotted name: file}`` for every module of the project's packages (subpackages included)."""
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except those in an ``if TYPE_CHECKING:`` body."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` refers to: itself, or the nearest enclosing project module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(module: str, modules: dict[str, Path]) -> set[str]:
    path = modules[module]
    is_pkg = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in _import_nodes(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            if node.level:
                # Relative import: climb from this module's package.
                base = module.split(".") if is_pkg else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from pkg import mod" names a submodule; "from mod import func" names the module itself.
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        for target in targets:
            hit = _resolve(target, modules)
            if hit is not None and hit != module:
                found.add(hit)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(m, modules) for m in modules}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a closed path ``a -> b -> ... -> a``) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan; the graph has ~70 nodes, so recursion depth is no concern
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                strongconnect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strongconnect(v)
    return [_cycle_in(comp, graph) for comp in components]


def _cycle_in(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest closed path ``start -> ... -> start`` through the component's first module (breadth-first
    inside the component, which holds one because it is strongly connected)."""
    members, start = set(component), component[0]
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & members):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    return component


def test_graph_sees_known_edges():
    """The parser finds the import forms the project uses (guards against a graph that is silently empty)."""
    graph = import_graph()
    assert "datamodules.clips" in graph["datamodules.paired"]  # from datamodules.clips import ...
    assert "datamodules.dicom" in graph["datamodules.clips"]
    assert "datamodules.clips" in graph["stages.predict"]
    assert "lightning_modules.nets.msunet" in graph["lightning_modules.seg_stage"]
    assert "lightning_modules.export" in graph["stages.predict"]  # function-level import


def test_cycle_finder_reports_each_cycle_as_a_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "x": {"y"}, "y": {"x"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"], ["x", "y", "x"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_datamodules_do_not_import_stages_or_models():
    graph = import_graph()
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m.startswith("datamodules")
        for t in targets
        if t.startswith(("stages", "lightning_modules"))
    )
    assert not bad, "datamodules must not depend on stages / lightning_modules:\n" + "\n".join(bad)


def test_command_shims_import_no_other_stage():
    """``stages/`` holds thin commands; what two of them share lives in datamodules/ or lightning_modules/.
    Exceptions by design: the CLI front (``cli``, ``__main__``) dispatches to every command, the step
    runner uses its warm server, and every command may use ``stages.options`` (the argparse ``type=``
    checks of option values, a leaf module that imports no stage)."""
    allowed = {"stages.cli", "stages.__main__", "stages", ("stages.step", "stages.warm")}
    assert not {t for t in import_graph()["stages.options"] if t.startswith(("stages", "datamodules"))}
    graph = import_graph()
    bad = sorted(
        f"{m} -> {t}"
        for m, targets in graph.items()
        if m.startswith("stages.") and m not in allowed
        for t in targets
        if t.startswith("stages.") and t != "stages.options" and (m, t) not in allowed
    )
    assert not bad, "a stage imports another stage:\n" + "\n".join(bad)
