"""The import graph of d2m_export/, converters/ and runtimes/ has no cycles, and the core stays below the
exporters and runners.

Every `import` and `from ... import` counts as an edge, at module level and inside functions alike: a
deferred import is how a cycle hides (it runs fine until someone imports the two modules in the other
order). `from pkg import name` is an edge to the submodule `pkg.name` when there is one, else to `pkg`.
Read from the source with `ast`; nothing is imported.

Layering (what holds, and is kept so):
- Stages in data-flow order (STAGES below): a module never imports a later stage, at module level or inside
  a function. Imports under `if TYPE_CHECKING:` (annotations only; they never run) do not count.
- `converters` and `runtimes` build on `d2m_export`; `d2m_export` never imports them at module level.
- Inside functions, only the entry points reach up to them, to dispatch a command or a stage to an exporter
  or a runner: the command line (`d2m_export.cli` and its modules, the sweep among them: it exports and
  benches each variant), the scripting API (`d2m_export.api`) and the runtime-efficiency probe
  (`profile --calibrate` benches exports). Nothing in `converters` or `runtimes` imports those entry points,
  so these edges cannot close a cycle.
- `converters` and `runtimes` use the stages' public names only: never a `_private` name, never the CLI.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("d2m_export", "converters", "runtimes")
# d2m_export modules (and packages, with their modules) that may import converters/runtimes, inside functions
# only (see the docstring)
ENTRY_POINTS = {"d2m_export.cli", "d2m_export.api", "d2m_export.devices.probe"}
# d2m_export in data-flow order, first to last: (stage, the modules and packages in it). An axis of variation
# (model families, devices) sits before the first stage that needs it. A module may import its own stage and
# earlier ones only.
STAGES = [
    ("foundation", ["d2m_export._version", "d2m_export.errors", "d2m_export.paths", "d2m_export.outputs"]),
    ("architectures", ["d2m_export.architectures"]),    # axis: one module per model family
    ("sources", ["d2m_export.sources"]),                # models, lazy weights, params/memory, corpora, shards
    ("devices", ["d2m_export.devices"]),                # axis: device profiles, roofline, the host probe
    ("plan", ["d2m_export.plan"]),                      # plan types, calibration, analysis, planners
    ("convert", ["d2m_export.methods"]),                # lfuc, prune, upcycle; moe2dense
    ("heal", ["d2m_export.heal"]),
    ("train", ["d2m_export.train"]),
    ("evaluate", ["d2m_export.evaluation"]),            # perplexity, tasks, report
    ("pipeline", ["d2m_export.pipeline"]),              # the stages chained, each with its hand-off file
    ("api", ["d2m_export.api", "d2m_export"]),          # d2m_export/__init__.py re-exports the API
    ("cli", ["d2m_export.cli"]),                        # the command line; sweep and demo
]


def within(module: str, prefixes) -> bool:
    """The module is one of the prefixes, or inside one of those packages (`d2m_export` itself: only itself)."""
    return any(module == p or (p != "d2m_export" and module.startswith(p + ".")) for p in prefixes)


def stage_of(module: str) -> int | None:
    return next((i for i, (_, prefixes) in enumerate(STAGES) if within(module, prefixes)), None)


def typing_only_lines(path: Path) -> set[int]:
    """Lines of the imports under a module-level `if TYPE_CHECKING:` (annotations only: they never run)."""
    lines = set()
    for node in ast.parse(path.read_text(), filename=str(path)).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt)
                      if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


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
    assert {"d2m_export", "d2m_export.cli", "d2m_export.cli.parser", "d2m_export.heal", "d2m_export.heal.fit",
            "d2m_export.sources.models", "converters.base", "runtimes.bench"} <= graph.keys()
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
                                   if m.split(".")[0] == "d2m_export" and not within(m, ENTRY_POINTS)
                                   for t in targets if t.split(".")[0] in up})
    assert not outside_entry_points, ("only the entry points (" + ", ".join(sorted(ENTRY_POINTS)) +
                                      ") may reach converters/runtimes:\n" + "\n".join(outside_entry_points))


def test_every_module_has_a_stage():
    unplaced = sorted(m for m in project_modules() if m.split(".")[0] == "d2m_export" and stage_of(m) is None)
    assert not unplaced, "modules in no stage (add them to STAGES in tests/test_imports.py):\n" + "\n".join(unplaced)


def test_stages_import_in_data_flow_order():
    modules = project_modules()
    graph = import_graph()
    backwards = []
    for m, targets in graph.items():
        if m.split(".")[0] != "d2m_export" or stage_of(m) is None:
            continue
        typing_only = typing_only_lines(modules[m])
        for t, sites in targets.items():
            if stage_of(t) is None or stage_of(t) <= stage_of(m):
                continue
            for line, _ in sites:
                if line not in typing_only:
                    backwards.append(f"{m} ({STAGES[stage_of(m)][0]}) -> {t} ({STAGES[stage_of(t)][0]}), line {line}")
    order = " -> ".join(name for name, _ in STAGES)
    assert not backwards, f"an earlier stage imports a later one (order: {order}):\n" + "\n".join(backwards)


def test_stage_order_is_checked():
    assert [name for name, _ in STAGES][2:9] == ["sources", "devices", "plan", "convert", "heal", "train", "evaluate"]
    assert stage_of("d2m_export.methods.moe2dense") == 5 and stage_of("d2m_export") == stage_of("d2m_export.api")
    assert stage_of("d2m_export.plan.planner") == 4 and stage_of("d2m_export.planner") is None
    # the planner names Method under TYPE_CHECKING only: that edge points forward, and is not counted
    planner = project_modules()["d2m_export.plan.planner"]
    edges = import_graph()["d2m_export.plan.planner"]
    assert {line for line, _ in edges["d2m_export.methods.base"]} <= typing_only_lines(planner)


def test_exporters_and_runners_use_public_names_only():
    modules = project_modules()
    found = []
    for m, path in modules.items():
        if m.split(".")[0] not in ("converters", "runtimes"):
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "d2m_export":
                if within(node.module, ["d2m_export.cli"]):
                    found.append(f"{m}: imports the CLI ({node.module}), line {node.lineno}")
                found += [f"{m}: {node.module}.{a.name}, line {node.lineno}"
                          for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Import):
                found += [f"{m}: {a.name}, line {node.lineno}" for a in node.names
                          if a.name.startswith("d2m_export") and (within(a.name, ["d2m_export.cli"])
                                                                  or any(p.startswith("_") for p in a.name.split(".")))]
    assert not found, "converters/runtimes reach past the stages' public names:\n" + "\n".join(found)
