"""The user guides' code blocks run as written: each page's ``python`` blocks in order as one
script, the command-line page's ``bash`` blocks in a shell, each page in a fresh directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import cli_env

DOCS = Path(__file__).resolve().parents[1] / "docs"
PAGES = ("guide-pytorch.md", "guide-trainer.md", "guide-lightning.md", "guide-cli.md")


def blocks(page: str, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", (DOCS / page).read_text(), flags=re.S)


def test_every_loop_has_a_guide() -> None:
    for page in PAGES:
        assert blocks(page, "python") or blocks(page, "bash"), f"{page} has no code to run"


@pytest.mark.parametrize("page", PAGES[:3])
def test_python_guide_runs(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import logging
    import warnings

    monkeypatch.chdir(tmp_path)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    code = "\n".join(blocks(page, "python"))
    exec(compile(code, str(DOCS / page), "exec"), {"__name__": f"guide_{page[6:-3]}"})
    run_dir = {"guide-pytorch.md": "runs/digits", "guide-trainer.md": "runs/trainer/inrun",
               "guide-lightning.md": "runs/lightning/inrun"}[page]
    from inrun.cli import main

    assert main(["report", run_dir]) == 0 and main(["inspect", run_dir]) == 0
    assert main(["curate", run_dir, "--drop", "negative"]) == 0


def test_cli_guide_runs(tmp_path: Path) -> None:
    env = cli_env()
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env["PATH"]])
    script = "set -euo pipefail\n" + "\n".join(blocks("guide-cli.md", "bash"))
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json

    result = json.loads((tmp_path / "runs/cli/curate/negative/curation.json").read_text())
    assert result["seeds"] == [0, 1] and all(len(c["final"]) == 2 and c["final_std"] > 0 for c in result["curves"].values())
    assert (tmp_path / "runs/cli/report.html").exists()
    assert 'id="plot-curation-negative"' in (tmp_path / "runs/cli/report.html").read_text()


def test_every_import_the_docs_show_works() -> None:
    """The import lines of README.md and docs/ (the public paths a user copies), and the
    documented names of the package, each resolve after the restructure (issue 21)."""
    import importlib

    root = DOCS.parent
    pages = [root / "README.md", *sorted(DOCS.glob("*.md"))]
    lines = {m.group(0).strip() for page in pages
             for m in re.finditer(r"^\s*(from inrun[\w.]* import [\w, ]+|import inrun[\w.]*)\s*$", page.read_text(), flags=re.M)}
    assert any("integrations.hf" in line for line in lines) and any("RunDir" in line for line in lines)
    for line in sorted(lines):
        exec(line, {})
    for module in ("inrun.integrations.hf", "inrun.integrations.lightning", "inrun.integrations.metrics",
                   "inrun.exact", "inrun.cli", "inrun.tracking.ddp", "inrun.analysis.baselines", "inrun.run.data.stdlib"):
        importlib.import_module(module)
    import inrun

    for name in ("InRunShapley", "ValueLedger", "RunWriter", "RunDir", "AuditConfig", "TrackerConfig", "exact"):
        assert hasattr(inrun, name), name
    done = subprocess.run([sys.executable, "-m", "inrun.cli", "--help"], env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "usage: inrun" in done.stdout
