"""The package reads as the data flows: each stage imports only the stages below it, and no module
imports itself back through others (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vlmbatch"
# Floors, lowest first: a module may import its own stage's modules and those of lower floors only.
FLOORS = {"errors": 0, "spec": 0, "hub": 0, "jobspec": 1, "sources": 1, "sinks": 1, "model": 2, "engine": 3,
          "evaluation": 4, "distributed": 4, "detection": 4, "review": 4,
          "scoring": 5,
          "pipeline": 5, "cli": 6, "__main__": 7, "__init__": 0}


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        found[".".join(parts).removesuffix(".__init__")] = path
    return found


def imports() -> dict[str, set[str]]:
    known = modules()
    graph: dict[str, set[str]] = {name: set() for name in known}
    for name, path in known.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vlmbatch"):
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in known and t != name and not name.startswith(t + ".")}
    return graph


def stage(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def test_every_module_has_a_floor():
    assert {stage(name) for name in modules()} <= FLOORS.keys()


def test_no_stage_imports_a_stage_above_it():
    upward = sorted(f"{name} -> {target}" for name, targets in imports().items() for target in targets
                    if stage(target) != stage(name) and FLOORS[stage(target)] > FLOORS[stage(name)])
    assert upward == []


def test_no_import_circles():
    graph, state, circles = imports(), {}, []

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for target in sorted(graph[name]):
            if state.get(target) == "open":
                circles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert circles == []
