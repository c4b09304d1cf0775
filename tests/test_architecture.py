"""The layout shows the architecture: cliptrase <- pipeline <- jobs, nothing runs back up, no
two modules import each other (module level, inside functions, or only for type checking),
and the functions of pipeline/ and jobs/ stay short enough to read."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = ("cliptrase", "pipeline", "jobs")  # each may import only the floors before it
LONGEST_FUNCTION = 80  # lines, in pipeline/ and jobs/


def _module(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, as absolute names (relative imports resolved)."""
    package = _module(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = ".".join(p for p in (parent, base) if p)
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def _graph() -> dict[str, set[str]]:
    sources = [p for floor in FLOORS for p in (ROOT / floor).rglob("*.py")]
    modules = {_module(p): p for p in sources}
    return {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_floor_imports_a_floor_above_it():
    upward = [
        f"{module} imports {target}"
        for module, targets in _graph().items()
        for target in targets
        if FLOORS.index(target.split(".")[0]) > FLOORS.index(module.split(".")[0])
    ]
    assert upward == []


def test_no_two_modules_import_each_other():
    """(A package's ``__init__`` re-exporting its submodules, which import names from the
    package, is how Python packages work, not a circle between two rooms.)"""
    graph = _graph()
    packages = {name for name in graph if "." not in name}
    pairs = sorted(
        {
            tuple(sorted((a, b)))
            for a, targets in graph.items()
            for b in targets
            if a in graph.get(b, ()) and not {a, b} & packages
        }
    )
    assert pairs == []


def test_functions_of_pipeline_and_jobs_are_shorter_than_80_lines():
    long = []
    for floor in ("pipeline", "jobs"):
        for path in sorted((ROOT / floor).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines >= LONGEST_FUNCTION:
                        long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} {lines}")
    assert long == []


def test_the_scan_resolves_relative_imports_inside_functions(tmp_path):
    probe = ROOT / "pipeline" / "_probe_for_architecture_test.py"
    try:
        probe.write_text("def f():\n    from .worker import ShardLabeler\n    from ..jobs import label\n")
        assert {"pipeline.worker", "pipeline.worker.ShardLabeler", "jobs"} <= _imports(probe)
    finally:
        probe.unlink()
