"""Render a report in headless Chromium: every plot must load and show ink (shared by the tests)."""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

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


def chromium() -> str | None:
    return next((shutil.which(b) for b in BROWSERS if shutil.which(b)), None)


def run_chromium(browser: str, *args: str) -> str:
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True, text=True, timeout=120,
        )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def assert_renders(browser: str, report: Path, tmp_path: Path, plots: tuple[str, ...]) -> str:
    """Load ``report`` in Chromium; each of ``plots`` must load and have ink in a screenshot.
    Returns the rendered DOM."""
    probe = tmp_path / "probe.html"
    probe.write_text(report.read_text().replace("</body>", PROBE + "</body>"))
    dom = run_chromium(browser, "--virtual-time-budget=10000", "--window-size=1280,1000", "--dump-dom", probe.as_uri())
    found = re.search(r'<pre id="probe">([^<]*)</pre>', dom)
    assert found, "the page did not finish loading in Chromium"
    lines = found.group(1).strip().splitlines()
    height = int(lines[0].split("=")[1])
    images = {}
    for line in lines[1:]:
        key, complete, nw, nh, x, y, w, h = line.split(",")
        images[key] = (complete == "true", int(nw), int(nh), int(x), int(y), int(w), int(h))
    for key in plots:
        complete, nw, nh, *_ = images[f"plot-{key}"]
        assert complete and nw > 0 and nh > 0, f"plot {key} did not load in Chromium: {images[f'plot-{key}']}"
    shot = tmp_path / "report.png"
    run_chromium(browser, f"--window-size=1280,{height}", f"--screenshot={shot}", report.as_uri())
    page = Image.open(shot).convert("L")
    assert page.size == (1280, height)
    for key in plots:
        *_, x, y, w, h = images[f"plot-{key}"]
        region = np.asarray(page.crop((x, y, x + w, y + h)))
        lo, hi = int(region.min()), int(region.max())
        ink = float((region < 200).mean())
        assert hi - lo > 100 and ink > 0.01, f"plot {key} is blank in the screenshot ({lo}-{hi}, ink {ink:.3f})"
    return dom
