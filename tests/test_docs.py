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
