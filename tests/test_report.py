"""The HTML report: self-contained, every plot present, and it renders in a real browser."""

from __future__ import annotations

import base64
import io
import re
from pathlib import Path

import pytest
from browser import assert_renders, chromium
from cli_helpers import gpt2_config, run_in_process
from PIL import Image

from inrun.analysis.report import build_report
from inrun.cli import main

EXPECTED_PLOTS = ("distribution", "sources", "stages", "cumulative", "loss")
@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "run"
    return run_in_process(gpt2_config(out, steps=24)).run_dir


def test_report_is_one_self_contained_file_with_every_plot(text_run, capsys) -> None:
    assert main(["report", str(text_run.path)]) == 0
    assert "report.html" in capsys.readouterr().out
    page = text_run.file("report.html").read_text()
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page), "the report must not load anything"
    assert "<script" not in page
    for key in EXPECTED_PLOTS:
        match = re.search(rf'id="plot-{key}"[^>]*src="data:image/png;base64,([^"]+)"', page)
        assert match, f"plot {key} missing"
        image = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
        assert image.width > 400 and image.height > 200
    assert "Most helpful" in page and "Most harmful" in page and "json" in page  # sources, previews
    assert "Fig. 3" in page


def test_report_renders_in_headless_chromium(text_run, tmp_path) -> None:
    browser = chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the report was not rendered in a browser")
    assert_renders(browser, build_report(text_run.path), tmp_path, EXPECTED_PLOTS)


def test_report_of_a_run_without_values_is_a_clear_error(tmp_path, capsys) -> None:
    (tmp_path / "run.json").write_text('{"format": 1, "config": {}}')
    assert main(["report", str(tmp_path)]) == 1
    assert "has no values" in capsys.readouterr().err
    assert main(["report", str(Path(tmp_path) / "nope")]) == 1
    assert "not a run directory" in capsys.readouterr().err
