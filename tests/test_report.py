"""The HTML report: self-contained, every plot present, and it renders in a real browser."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import gpt2_config, run_in_process
from PIL import Image

from inrun.cli import main
from inrun.report import build_report

EXPECTED_PLOTS = ("distribution", "sources", "stages", "cumulative", "loss")
BROWSERS = ("chromium", "chromium-browser", "google-chrome")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--force-device-scale-factor=1", "--hide-scrollbars",
)
# Appended to a copy of the report (the report itself has no scripts): once the page has
# loaded, write each image's state and position into the DOM, which --dump-dom then prints.
PROBE = """<script>
window.addEventListener('load', () => {
  const rows = [...document.images].map(i => {
    const r = i.getBoundingClientRect();
    return [i.id, i.complete, i.naturalWidth, i.naturalHeight,
            Math.round(r.left + scrollX), Math.round(r.top + scrollY), Math.round(r.width), Math.round(r.height)].join(',');
  });
  const pre = document.createElement('pre');
  pre.id = 'probe';
  pre.textContent = 'height=' + document.documentElement.scrollHeight + '\\n' + rows.join('\\n');
  document.body.appendChild(pre);
});
</script>"""


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


def _chromium() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def _run_chromium(browser: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_report_renders_in_headless_chromium(text_run, tmp_path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("Chromium is not installed (apt-get install chromium): the report was not rendered in a browser")
    report = build_report(text_run.path)
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = _run_chromium(browser, "--virtual-time-budget=10000", "--window-size=1280,1000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom)
    assert found, "the page did not finish loading in Chromium"
    lines = found.group(1).strip().splitlines()
    height = int(lines[0].split("=")[1])
    images = {}
    for line in lines[1:]:
        key, complete, nw, nh, x, y, w, h = line.split(",")
        images[key] = (complete == "true", int(nw), int(nh), int(x), int(y), int(w), int(h))
    for key in EXPECTED_PLOTS:
        complete, nw, nh, *_ = images[f"plot-{key}"]
        assert complete and nw > 0 and nh > 0, f"plot {key} did not load in Chromium: {images[f'plot-{key}']}"

    shot = tmp_path / "report.png"
    _run_chromium(browser, f"--window-size=1280,{height}", f"--screenshot={shot}", report.as_uri())
    page = Image.open(shot).convert("L")
    assert page.size == (1280, height)
    for key in EXPECTED_PLOTS:
        *_, x, y, w, h = images[f"plot-{key}"]
        region = np.asarray(page.crop((x, y, x + w, y + h)))
        lo, hi = int(region.min()), int(region.max())
        ink = float((region < 200).mean())
        assert hi - lo > 100 and ink > 0.01, f"plot {key} is blank in the screenshot ({lo}-{hi}, ink {ink:.3f})"


def test_report_of_a_run_without_values_is_a_clear_error(tmp_path, capsys) -> None:
    (tmp_path / "run.json").write_text('{"format": 1, "config": {}}')
    assert main(["report", str(tmp_path)]) == 1
    assert "has no values" in capsys.readouterr().err
    assert main(["report", str(Path(tmp_path) / "nope")]) == 1
    assert "not a run directory" in capsys.readouterr().err
