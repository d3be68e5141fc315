"""The layered-import contract, over the import graph of the source (ast, nothing imported):

    formats                       the user files' kernel (topology, scenario, units, errors,
                                  YAML, control settings)
    partitioner, stage_image      the planner; what runs on a host (agent, worker, wire)
    testbed.control               the control plane (decision core, plane, controller,
                                  dispatcher, planning)
    testbed.emulation, testbed.k8s  the backends (Mininet/Docker hosts; k3s)
    testbed.experiment            the experimenter (driver, runs, results, reports)

A module may import its own package and the layers below it, never a layer above nor a
package beside it on its layer; and no group of modules imports itself round in a circle
(imports inside functions count too: a cycle deferred to run time is still a cycle).
docs/architecture.md states the same layers.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("formats", "partitioner", "stage_image", "testbed")
# (package prefix, layer): the longest matching prefix decides
LAYERS = (("formats", 0), ("partitioner", 1), ("stage_image", 1), ("testbed", 2),
          ("testbed.control", 2), ("testbed.emulation", 3), ("testbed.k8s", 3),
          ("testbed.experiment", 4))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


@cache
def graph() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (packages resolved to their modules)."""
    modules = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    edges: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import module` imports pkg.module when that is a module
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules
                           else node.module for a in node.names]
            edges[name].update(t for t in targets if t in modules and t != name)
    return edges


def layer(module: str) -> tuple[int, str]:
    prefix, level = max(((p, n) for p, n in LAYERS
                         if module == p or module.startswith(p + ".")),
                        key=lambda item: len(item[0]))
    return level, prefix


def test_no_module_imports_a_layer_above_or_beside() -> None:
    wrong = []
    for module, imports in sorted(graph().items()):
        mine = layer(module)
        for other in sorted(imports):
            theirs = layer(other)
            if theirs[0] > mine[0] or (theirs[0] == mine[0] and theirs[1] != mine[1]
                                       and mine[1] != "testbed" and theirs[1] != "testbed"):
                wrong.append(f"{module} -> {other}")
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_formats_partitioner_and_stage_image_never_import_testbed() -> None:
    wrong = [f"{m} -> {o}" for m, imports in graph().items() if not m.startswith("testbed")
             for o in imports if o.startswith("testbed")]
    assert not wrong, wrong


def test_no_import_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}          # 1: on the path, 2: done
    cycles: list[list[str]] = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for other in sorted(edges.get(module, ())):
            if state.get(other) == 1:
                cycles.append(path[path.index(other):] + [other])
            elif other not in state:
                visit(other, path + [other])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_the_contract_sees_the_code() -> None:
    edges = graph()
    assert "testbed.control.plane" in edges["testbed.control.controller"]
    assert "formats.control" in edges["testbed.k8s.loop"]
    assert layer("testbed.control.core.health") == (2, "testbed.control")
