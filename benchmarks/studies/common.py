"""Small helpers shared by the case-study scripts: threads, timing, tables, caching, paths.

Import this module *before* torch in a script (``from studies import common`` first): it sets
``OMP_WAIT_POLICY=PASSIVE`` unless the caller chose a policy. On a shared 2-core machine
OpenMP's default busy-waiting made a 2-thread step of the small GPT-2 about 7x slower than a
1-thread step (1.9 s vs 0.26 s measured here under a load average of ~4); with passive waiting
2 threads are never slower than 1.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
CACHE = REPO / "runs" / "studies"


def parser(description: str) -> argparse.ArgumentParser:
    """The options every study script takes."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--quick", action="store_true", help="tiny settings: a smoke test, not a result")
    p.add_argument("--fresh", action="store_true", help="ignore cached training runs and recompute them")
    p.add_argument("--no-docs", action="store_true", help="do not write plots/tables under docs/")
    p.add_argument("--cache", default=None, help=f"cache directory for training runs (default {CACHE.relative_to(REPO)})")
    return p


def start(p: argparse.ArgumentParser) -> tuple[argparse.Namespace, Clock]:
    """Parse the arguments, apply them (threads, cache) and start the clock."""
    args = p.parse_args()
    setup(args)
    return args, Clock()


def setup(args: argparse.Namespace) -> None:
    global CACHE
    import logging

    if getattr(args, "cache", None):
        CACHE = Path(args.cache).resolve()
    import warnings

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*loss_type.*")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover
        pass


class Clock:
    """Wall and CPU seconds since creation, and the load average seen at creation and now."""

    def __init__(self) -> None:
        self.wall0 = time.perf_counter()
        self.cpu0 = _cpu()
        self.load0 = os.getloadavg()[0]

    def wall(self) -> float:
        return time.perf_counter() - self.wall0

    def cpu(self) -> float:
        return _cpu() - self.cpu0

    def summary(self) -> str:
        return (
            f"wall {self.wall():.0f} s, CPU {self.cpu():.0f} s (user+sys, this process), "
            f"load average {self.load0:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
            f"{os.cpu_count()} cores"
        )


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def fmt(x: float, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and np.isnan(x)):
        return "–"
    return f"{x:.{digits}f}"


def mean_std(xs: Sequence[float], digits: int = 3) -> str:
    """``mean (std)`` over seeds, population std as in the paper's tables; ``–`` if empty."""
    a = np.asarray([x for x in xs if x is not None and np.isfinite(x)], dtype=float)
    if a.size == 0:
        return "–"
    if a.size == 1:
        return f"{a[0]:.{digits}f}"
    return f"{a.mean():.{digits}f} ({a.std(ddof=0):.{digits}f})"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (cells are formatted with ``str``)."""
    out = ["| " + " | ".join(h.replace("|", "\\|") for h in headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |")
    return "\n".join(out)


def key(obj: Any) -> str:
    """A short stable hash of a configuration (dataclass or JSON-able)."""
    data = asdict(obj) if is_dataclass(obj) else obj
    return hashlib.sha1(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_doc(name: str, text: str) -> Path:
    DOCS.mkdir(parents=True, exist_ok=True)
    path = DOCS / name
    path.write_text(text)
    return path


def preview(text: str, width: int = 60) -> str:
    """One line of a chunk for a table: whitespace collapsed, backticks/pipes made harmless."""
    flat = " ".join(text.split()).replace("`", "'")
    return flat if len(flat) <= width else flat[: width - 1] + "…"
