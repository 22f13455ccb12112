"""The import graph of qtrainer/: no cycle (imports inside functions count), and the engine stays below the Trainer.

Every ``import``/``from ... import`` anywhere in a module (module level, functions, methods,
``if TYPE_CHECKING`` blocks) is an edge to the module it names: ``from a.b import c`` is an edge to
``a.b.c`` when that is a module of qtrainer, else to ``a.b``; relative imports are resolved against
the importing module's package. Parent packages that Python initialises on the way are not edges
(every module would otherwise depend on ``qtrainer/__init__``).
"""
from __future__ import annotations

import ast
import functools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qtrainer"
# What the engine must not import (the Trainer and the layers above it).
ABOVE_THE_ENGINE = ("qtrainer.trainer", "qtrainer.callbacks", "qtrainer.loops", "qtrainer.state",
                    "qtrainer.checkpointing", "qtrainer.strategies", "qtrainer.spawn")


@functools.lru_cache(maxsize=None)
def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        names[".".join(parts)] = path
    return names


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> dict[str, int]:
    """The qtrainer modules that ``name`` imports, each with the line of its first import."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found: dict[str, int] = {}

    def add(target: str, line: int) -> None:
        if target.split(".")[0] == "qtrainer" and target != name:
            while target not in modules:  # an attribute of a module, e.g. qtrainer.loops.fit.FitLoop
                target = target.rpartition(".")[0]
            if target != name:
                found.setdefault(target, line)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                candidate = f"{source}.{alias.name}"
                add(candidate if candidate in modules else source, node.lineno)
    return found


@functools.lru_cache(maxsize=None)
def import_graph() -> dict[str, dict[str, int]]:
    modules = module_names()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def describe(cycle: list[str], graph: dict[str, dict[str, int]]) -> str:
    modules = module_names()
    steps = [f"{a} ({modules[a].relative_to(ROOT)}:{graph[a][b]}) -> {b}" for a, b in zip(cycle, cycle[1:])]
    return "import cycle: " + "; ".join(steps)


def test_the_graph_reader_sees_imports_at_any_depth_and_relative_ones(tmp_path):
    modules = {"qtrainer": tmp_path, "qtrainer.a": tmp_path, "qtrainer.a.b": tmp_path, "qtrainer.c": tmp_path}
    source = tmp_path / "b.py"
    source.write_text("def f():\n    from . import x\n    from ..c import y\n    import qtrainer.a\n")
    assert imports_of("qtrainer.a.b", source, modules) == {"qtrainer.a": 2, "qtrainer.c": 3}
    assert find_cycle({"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": 1}, "b": {}}) is None


def test_qtrainer_has_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 40 and "qtrainer.trainer" in graph["qtrainer"]
    cycle = find_cycle(graph)
    assert cycle is None, describe(cycle, graph)


@pytest.mark.parametrize("engine_module", sorted(n for n in module_names() if n.startswith("qtrainer.quant.")))
def test_the_quantization_engine_does_not_import_the_trainer_or_callbacks(engine_module):
    imported = import_graph()[engine_module]
    above = {target: line for target, line in imported.items()
             if any(target == a or target.startswith(a + ".") for a in ABOVE_THE_ENGINE)}
    path = module_names()[engine_module].relative_to(ROOT)
    assert not above, f"{path} imports {', '.join(f'{t} (line {n})' for t, n in above.items())}"
