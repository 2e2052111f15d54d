"""The repository itself: no merge-conflict markers, no import circle, imports only from the floors
below, the tracker kept in parts."""

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


# The floors of the package, bottom first: a module imports only from its own floor or below,
# never from a floor above (README's module map shows the same floors).
FLOORS = (
    ("ground", ("inrun.errors", "inrun.modes", "inrun.version", "inrun.files", "inrun.shapley",
                "inrun.optim", "inrun.exact", "inrun.layers")),
    ("tracking", ("inrun.tracking",)),
    ("store", ("inrun.store",)),
    ("tracker", ("inrun.tracker",)),
    ("run", ("inrun.run",)),
    ("analysis", ("inrun.analysis",)),
    ("integrations", ("inrun.integrations",)),
    ("cli", ("inrun.cli",)),
    ("package", ("inrun",)),
)


def _floor(module: str) -> int:
    """The floor of a module: the longest declared prefix that holds it."""
    best = None
    for level, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (level, len(prefix))
    assert best is not None, f"{module} is on no floor: add it to FLOORS in tests/test_repo.py"
    return best[0]


def _modules() -> dict[str, tuple[Path, bool]]:
    """Every module of src/inrun: dotted name -> (path, is a package)."""
    src = ROOT / "src"
    out = {}
    for path in (src / "inrun").rglob("*.py"):
        parts = list(path.relative_to(src).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _imports(path: Path, name: str, is_pkg: bool, modules: set[str]) -> list[tuple[str, int]]:
    """``(module, line)`` of every ``inrun`` module a file imports: at module level, inside
    functions and under ``TYPE_CHECKING`` alike (a deferred import is still an arrow)."""
    import ast

    package = name if is_pkg else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            named = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in modules]
            out += [(t, node.lineno) for t in named or [target]]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return [(t, line) for t, line in out if t in modules and t != name]


def _graph() -> dict[str, list[tuple[str, int]]]:
    modules = _modules()
    graph = {m: _imports(p, m, pkg, set(modules)) for m, (p, pkg) in modules.items()}
    # A package's __init__ importing its own submodules is the package, not an arrow between them.
    return {m: [(t, line) for t, line in deps if not t.startswith(m + ".")] for m, deps in graph.items()}


def test_no_import_circle_in_the_package() -> None:
    """No circle of imports, counting imports inside functions and under TYPE_CHECKING."""
    graph = _graph()
    assert "inrun.tracking.engine" in graph
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted({t for t, _ in graph[m]}):
            if m.startswith(n + "."):
                continue  # a module imports its own package (for its other submodules)
            if state.get(n) == 1:
                raise AssertionError("import circle: " + " -> ".join([*stack[stack.index(n):], n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_no_import_from_a_higher_floor() -> None:
    """Each module imports only from its floor or those below (FLOORS), wherever the import is."""
    graph = _graph()
    wrong = [f"{m} (floor {FLOORS[_floor(m)][0]}) imports {t} (floor {FLOORS[_floor(t)][0]}) at line {line}"
             for m, deps in sorted(graph.items()) for t, line in deps if _floor(t) > _floor(m)]
    assert not wrong, "imports from a higher floor:\n" + "\n".join(wrong)


def test_the_floor_test_sees_function_level_and_type_checking_imports(tmp_path) -> None:
    """The two tests above would fail on a deferred import that runs the wrong way."""
    probe = tmp_path / "probe.py"
    probe.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..cli import main\n"
                     "def f():\n    from ..tracker import InRunShapley\n")
    found = {t for t, _ in _imports(probe, "inrun.store.probe", False, {"inrun.cli", "inrun.tracker"})}
    assert found == {"inrun.cli", "inrun.tracker"}
    assert _floor("inrun.cli") > _floor("inrun.store.probe") and _floor("inrun.tracker") > _floor("inrun.store.probe")


def test_the_tracker_stays_in_parts() -> None:
    """The facade reads on a few screens and no part of the tracker grows into a second tracker
    (issue 12: facade under 300 lines, each module of ``inrun.tracking`` under 400)."""
    src = Path(__file__).resolve().parents[1] / "src" / "inrun"
    facade = len((src / "tracker.py").read_text().splitlines())
    assert facade < 300, f"src/inrun/tracker.py has {facade} lines: move the work into inrun/tracking"
    too_long = {str(p.relative_to(src)): n for p in (src / "tracking").rglob("*.py")
                if (n := len(p.read_text().splitlines())) >= 400}
    assert not too_long, f"modules of inrun/tracking over 400 lines: {too_long}"
