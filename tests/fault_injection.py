"""Flip random bytes in the files of a finished run directory: each flip must be detected or
provably harmless, never read back as different values.

For each trial, a fresh copy of a pristine run directory gets one byte of one file XOR-ed with
a random non-zero mask. The copy is then

* **detected** when ``RunDir.verify()`` reports a problem, or when reading it through the
  public readers raises an inrun error (what ``inrun report``, ``curate`` or a resume would do);
* **harmless** when it verifies and everything read back (values, per-validation table, trace,
  metrics, examples, metadata, status, and every checkpoint's state, ledger and metrics) equals
  the pristine run's, exactly;
* **silent** otherwise: read back as different values without an error. There must be none.

``python tests/fault_injection.py`` runs the full sweep (every file, ``--flips`` trials each)
on a small run it trains first and prints a table; it exits with 1 if any flip was silent. The
test suite runs a seeded sample (``tests/test_integrity.py``).
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from cli_helpers import digits_config, run_in_process  # noqa: E402

from inrun.errors import InRunError  # noqa: E402
from inrun.store.rundir import RunDir  # noqa: E402

AUDITED = ("audit.every=5", "audit.players=4", "audit.budget=1.0")
"""The run audits steps 5, 10 and 15, so its audit files hold rows to damage."""


def make_run(out: Path, steps: int = 20, every: int = 5) -> Path:
    """A small finished run (digits MLP, order 2, trace, audited, 2 checkpoints kept) with its report."""
    from inrun.analysis.report import build_report

    run_in_process(digits_config(out, steps=steps, order=2, every=every), overrides=AUDITED)
    build_report(out)
    return out


def files_of(run: Path) -> list[str]:
    """Every non-empty file of the run directory, relative, sorted."""
    return sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.stat().st_size > 0)


def snapshot(path: Path) -> dict[str, Any]:
    """Everything a reader gets from a run directory (raises an InRunError when refused)."""
    rd = RunDir(path)
    ledger = rd.ledger()
    v = ledger.values()
    out: dict[str, Any] = {
        "meta": rd.meta(),
        "state": rd.status().get("state"),
        "ids": list(v),
        "value": v.value, "first": v.first_order, "second": v.second_order, "count": v.counts,
        "sources": list(v.sources),
        "skipped": ledger.skipped, "steps": ledger.steps,
        "per_validation": ledger.per_validation(),
        "trace": ledger.trace(),
        "metrics": rd.metrics(),
        "examples": rd.examples().to_dict("list"),
        "audit": _audit_rows(rd),
        "checkpoints": {},
    }
    for step, ck in rd.checkpoints():
        state, cl, metrics = rd.load_checkpoint(ck, torch.device("cpu"))
        cv = cl.values() if cl is not None else None
        out["checkpoints"][step] = {
            "model": state["objects"]["model"], "rng": state["rng"]["torch"], "step": state["step"],
            "tracker": state["tracker"], "values": None if cv is None else (list(cv), cv.value, cv.counts),
            "trace": None if cl is None else cl.trace(), "metrics": metrics,
        }
    return out


def _audit_rows(rd: RunDir) -> Any:
    """The audit's rows and settings, timings included (they are stored numbers like any other)."""
    log = rd.audit()
    return None if log is None else {"steps": log.steps, "values": log.values, "config": log.config}


def same(a: Any, b: Any) -> bool:
    """Exact equality of nested snapshots (NaN equals NaN; tensors and arrays element-wise)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        a, b = np.asarray(a), np.asarray(b)
        if a.shape != b.shape or a.dtype != b.dtype:
            return False
        return bool(np.array_equal(a, b, equal_nan=a.dtype.kind == "f"))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if hasattr(a, "__dataclass_fields__") and type(a) is type(b):
        return same(vars(a), vars(b))
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (a != a and b != b)
    return type(a) is type(b) and a == b


def flip_one(pristine: Path, rel: str, rng: random.Random, reference: dict[str, Any], work: Path) -> tuple[str, str]:
    """One trial: ``(outcome, detail)`` with outcome detected / harmless / silent."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(pristine, work)  # plain copies: the trial's files share no inode with others
    target = work / rel
    data = bytearray(target.read_bytes())
    offset = rng.randrange(len(data))
    mask = rng.randrange(1, 256)
    data[offset] ^= mask
    target.write_bytes(bytes(data))
    detail = f"byte {offset} ^ 0x{mask:02x}"
    problems = RunDir(work).verify()
    if problems:
        return "detected", f"{detail}: {problems[0][:160]}"
    try:
        got = snapshot(work)
    except InRunError as exc:
        return "detected", f"{detail}: read refused: {str(exc)[:160]}"
    return ("harmless" if same(reference, got) else "silent"), detail


def sweep(pristine: Path, files: list[str], flips: int, seed: int) -> list[tuple[str, str, str]]:
    """``(file, outcome, detail)`` for ``flips`` trials of each of ``files``."""
    rng = random.Random(seed)
    reference = snapshot(pristine)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for rel in files:
            for _ in range(flips):
                outcome, detail = flip_one(pristine, rel, rng, reference, Path(tmp) / "trial")
                rows.append((rel, outcome, detail))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flips", type=int, default=8, help="trials per file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--run", help="sweep this finished run directory instead of training one")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(args.run) if args.run else make_run(Path(tmp) / "run")
        files = files_of(run)
        rows = sweep(run, files, args.flips, args.seed)
    by_file: dict[str, Counter] = {}
    for rel, outcome, _ in rows:
        by_file.setdefault(rel, Counter())[outcome] += 1
    print("| file | flips | detected | harmless | silent |\n|---|---:|---:|---:|---:|")
    for rel, c in by_file.items():
        print(f"| {rel} | {sum(c.values())} | {c['detected']} | {c['harmless']} | {c['silent']} |")
    total = Counter(outcome for _, outcome, _ in rows)
    print(f"| **all {len(by_file)} files** | {len(rows)} | {total['detected']} | {total['harmless']} | {total['silent']} |")
    for rel, outcome, detail in rows:
        if outcome == "silent":
            print(f"SILENT: {rel}: {detail}")
    return 1 if total["silent"] else 0


if __name__ == "__main__":
    sys.exit(main())
