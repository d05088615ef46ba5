"""The import graph of d2m_export/, converters/ and runtimes/ has no cycles, and the core stays below the
exporters and runners.

Every `import` and `from ... import` counts as an edge, at module level and inside functions alike: a
deferred import is how a cycle hides (it runs fine until someone imports the two modules in the other
order). `from pkg import name` is an edge to the submodule `pkg.name` when there is one, else to `pkg`.
Read from the source with `ast`; nothing is imported.

Layering (what holds, and is kept so):
- `converters` and `runtimes` build on `d2m_export`; `d2m_export` never imports them at module level.
- Inside functions, only the entry points reach up to them, to dispatch a command or a stage to an exporter
  or a runner: the command line (`d2m_export.cli`), the scripting API (`d2m_export.api`), the sweep (it
  exports and benches each variant) and the runtime-efficiency probe (`profile --calibrate` benches exports).
  Nothing in `converters` or `runtimes` imports those entry points, so these edges cannot close a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("d2m_export", "converters", "runtimes")
# d2m_export modules that may import converters/runtimes, inside functions only (see the docstring)
ENTRY_POINTS = {"d2m_export.cli", "d2m_export.api", "d2m_export.sweep", "d2m_export.devices.probe"}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def import_edges(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported project module, line, at module level) for every import statement in the file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    for node in tree.body:      # `if TYPE_CHECKING:` / `try:` blocks at module level run at import too
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
    edges = []

    def add(target: str, node: ast.AST) -> None:
        while target and target not in modules:    # `import a.b.c` of a name that is not a module: its parent
            target = target.rpartition(".")[0]
        if target and target != name:
            edges.append((target, node.lineno, id(node) in top_level))

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    add(alias.name, node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                add(sub if sub in modules else source, node)
    return edges


def import_graph() -> dict[str, dict[str, list[tuple[int, bool]]]]:
    """module → {imported module → [(line, at module level)]}."""
    modules = project_modules()
    graph: dict[str, dict[str, list]] = {m: {} for m in modules}
    for name, path in modules.items():
        for target, line, top in import_edges(name, path, modules):
            graph[name].setdefault(target, []).append((line, top))
    return graph


def find_cycle(graph) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}      # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def describe(graph, cycle: list[str]) -> str:
    return "\n".join(f"  {a} -> {b} (" + ", ".join(f"line {line}{'' if top else ', in a function'}"
                                                  for line, top in graph[a][b]) + ")"
                     for a, b in zip(cycle, cycle[1:]))


def test_graph_sees_every_package_and_deferred_imports():
    graph = import_graph()
    assert {"d2m_export", "d2m_export.cli", "d2m_export.heal", "d2m_export.heal.fit", "converters.base",
            "runtimes.bench"} <= graph.keys()
    # a function-level import is an edge (the API's deferred import of the exporters); a cycle is found
    assert any(not top for _, top in graph["d2m_export.api"]["converters.base"])
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]


def test_no_import_cycles():
    graph = import_graph()
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle:\n" + describe(graph, cycle)


def test_core_does_not_import_exporters_or_runners():
    graph = import_graph()
    up = ("converters", "runtimes")
    at_module_level = [f"{m} -> {t} (line {line})" for m, targets in graph.items() if m.split(".")[0] == "d2m_export"
                       for t, sites in targets.items() if t.split(".")[0] in up for line, top in sites if top]
    assert not at_module_level, "d2m_export imports converters/runtimes at module level:\n" + "\n".join(at_module_level)
    outside_entry_points = sorted({f"{m} -> {t}" for m, targets in graph.items()
                                   if m.split(".")[0] == "d2m_export" and m not in ENTRY_POINTS
                                   for t in targets if t.split(".")[0] in up})
    assert not outside_entry_points, ("only the entry points (" + ", ".join(sorted(ENTRY_POINTS)) +
                                      ") may reach converters/runtimes:\n" + "\n".join(outside_entry_points))
