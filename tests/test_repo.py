"""The repository itself: no merge-conflict markers left in any tracked text file."""

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
