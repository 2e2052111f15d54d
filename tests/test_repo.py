"""The repository itself: no merge-conflict markers, no import cycle, the tracker kept in parts."""

from __future__ import annotations

import os
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {".venv", "runs", ".git", ".pytest_cache", ".ruff_cache", "__pycache__"}
TEXT = {".py", ".md", ".toml", ".txt", ".cfg", ".yml", ".yaml", ".html"}
MARKER = re.compile(r"^(<{7}|>{7}) |^={7}$", re.M)


def test_no_merge_conflict_markers() -> None:
    files = []
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if d not in SKIP]  # prune: never walk the virtual environment
        files += [Path(folder, n) for n in names if Path(n).suffix in TEXT or n in {"Makefile", "run"}]
    assert len(files) > 20  # the walk found the repository
    bad = [str(p.relative_to(ROOT)) for p in files if MARKER.search(p.read_text(errors="replace"))]
    assert not bad, f"merge-conflict markers in {bad}"


def _module_imports(path: Path, package: str) -> set[str]:
    """The ``inrun`` modules a source file imports at module level (function-level imports are
    deferred on purpose and cannot form a cycle at import time)."""
    import ast

    tree = ast.parse(path.read_text())
    out = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [f"{target}.{a.name}" for a in node.names]
            out.update([target, *names])
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
    return {m for m in out if m.startswith("inrun")}


def test_no_import_cycle_in_the_package() -> None:
    src = ROOT / "src"
    modules = {}
    for path in (src / "inrun").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        if is_pkg:
            parts = parts[:-1]
        name = ".".join(parts)
        modules[name] = (path, name if is_pkg else ".".join(parts[:-1]))
    graph = {m: {i for i in _module_imports(p, pkg) if i in modules and i != m} for m, (p, pkg) in modules.items()}
    # A package's __init__ importing its own submodules is not a cycle of the submodules.
    graph = {m: {i for i in deps if not m.startswith(i + ".")} for m, deps in graph.items()}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    assert "inrun.tracking.engine" in graph
    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_tracker_stays_in_parts() -> None:
    """The facade reads on a few screens and no part of the tracker grows into a second tracker
    (issue 12: facade under 300 lines, each module of ``inrun.tracking`` under 400)."""
    src = Path(__file__).resolve().parents[1] / "src" / "inrun"
    facade = len((src / "tracker.py").read_text().splitlines())
    assert facade < 300, f"src/inrun/tracker.py has {facade} lines: move the work into inrun/tracking"
    too_long = {p.name: n for p in (src / "tracking").glob("*.py")
                if (n := len(p.read_text().splitlines())) >= 400}
    assert not too_long, f"modules of inrun/tracking over 400 lines: {too_long}"
