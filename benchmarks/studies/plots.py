"""Matplotlib helpers for the study plots (Agg backend, PNG under docs/case-studies/) and publishing."""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from . import common

OUT = common.DOCS / "case-studies"


def save(fig: plt.Figure, name: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_md(name: str, text: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    path.write_text(text)
    return path


# The block of docs/case-studies.md that each study's default run rewrites.
SUMMARY_TAGS = {"curation": "CUR", "stages": "STA", "paraphrase": "PAR", "domains": "DOM", "mislabel": "MIS",
                "selection": "SEL"}


def publish(stem: str, fig: plt.Figure, text: str, time_line: str, args: argparse.Namespace) -> None:
    """Print the tables and the time; unless ``--quick``/``--no-docs``, write the plot, the study's
    own page and its block in docs/case-studies.md."""
    print(text)
    print(f"\nTime: {time_line}")
    if args.no_docs or args.quick:
        plt.close(fig)
        return
    png = save(fig, f"{stem}.png")
    write_md(f"{stem}.md", text + f"\n\n![{stem}]({png.name})\n\nTime: {time_line}\n")
    _sync_summary(stem, text)
    print(f"wrote {png.relative_to(common.REPO)}")


def _sync_summary(stem: str, text: str) -> None:
    tag = SUMMARY_TAGS.get(stem)
    doc = common.DOCS / "case-studies.md"
    if tag is None or not doc.exists():
        return  # a variant run (another removal rule, order 1): its own page only
    start, end = f"<!-- {tag} -->\n", f"<!-- /{tag} -->"
    content = doc.read_text()
    i, j = content.find(start), content.find(end)
    if i < 0 or j < i:
        return
    block = (f"{text}\n\n![{stem}](case-studies/{stem}.png)\n\n*Regenerate with `benchmarks/study_{stem}.py`; "
             f"tables also in [case-studies/{stem}.md](case-studies/{stem}.md).*\n")
    tmp = doc.with_suffix(".md.tmp")
    tmp.write_text(content[: i + len(start)] + block + content[j:])
    tmp.replace(doc)
