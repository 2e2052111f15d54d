"""A screenshot of a report's sections (default: the headline and the fidelity panel) for docs/.

The sections are cut out of the report's own HTML (same CSS, same embedded plots), rendered by
headless Chromium and cropped to the content::

    PYTHONPATH=src python benchmarks/report_screenshot.py runs/demo docs/report-fidelity.png
    PYTHONPATH=src python benchmarks/report_screenshot.py runs/demo docs/report.png --sections all
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np


def sections(page: str, keep: list[str]) -> str:
    """The page with only its header (title, subtitle, cards) and the ``<h2 id=...>`` sections in ``keep``."""
    head, _, rest = page.partition("<main>")
    body, _, tail = rest.partition("</main>")
    first = re.search(r"<h2[ >]", body)
    top = body[: first.start()] if first else body
    top = re.sub(r"<h2.*", "", top, flags=re.S)
    pieces = re.split(r"(?=<h2[ >])", body[first.start():] if first else "")
    chosen = [p for p in pieces if any(re.match(rf'<h2 id="?{k}"?[ >]', p) for k in keep)]
    return f"{head}<main>{top}{''.join(chosen)}</main>{tail}"


def crop(path: Path, margin: int = 16) -> None:
    import matplotlib.image as mpimg

    img = mpimg.imread(path)
    ink = (img[..., :3] < 0.97).any(axis=2)
    rows = np.flatnonzero(ink.any(axis=1))
    if len(rows):
        mpimg.imsave(path, img[: min(img.shape[0], rows[-1] + margin)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--sections", default="fidelity", help="comma-separated section ids (fidelity, distribution, views, ...) or 'all'")
    p.add_argument("--width", type=int, default=1200)
    args = p.parse_args()
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        raise SystemExit("needs headless Chromium (chromium, chromium-browser or google-chrome on PATH)")
    page = (Path(args.run_dir) / "report.html").read_text(encoding="utf-8")
    if args.sections != "all":
        page = sections(page, args.sections.split(","))
    out = Path(args.out).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        html = Path(tmp) / "page.html"
        html.write_text(page, encoding="utf-8")
        subprocess.run(
            [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--window-size={args.width},{2400 if args.sections != 'all' else 9000}", f"--screenshot={out}",
             html.as_uri()],
            check=True, capture_output=True, timeout=180,
        )
    crop(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
