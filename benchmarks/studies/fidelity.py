"""What the audit measured during a study's valued runs, as a table and a sentence for each verdict.

Each valued run of the studies is made with ``InRunShapley(..., audit=...)``: at the audited steps
the exact Shapley values of the step's game for a sample of its batch, next to the tracker's
value rule on the same game (:mod:`inrun.tracking.audit`). Here the rows of one or several runs
(several seeds) are summarized: medians over the audited steps, split into early steps (where
most of the value accrues) and the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from . import common

EARLY = 25
"""Steps up to this one are "early" (the first 25 steps hold much of a run's value)."""


def _ok(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [r for r in rows if r["status"] == "ok"]


def _median(rows: Sequence[Mapping[str, Any]], key: str) -> float:
    xs = [r[key] for r in rows if r[key] is not None and np.isfinite(r[key])]
    return float(np.median(xs)) if xs else float("nan")


def numbers(rows: Sequence[Mapping[str, Any]], early: int = EARLY) -> dict[str, Any]:
    ok = _ok(rows)
    first = [r for r in ok if r["step"] <= early]
    later = [r for r in ok if r["step"] > early]
    return {
        "steps": len(ok),
        "players": sorted({r["players"] for r in ok}),
        "pearson": _median(ok, "pearson"), "pearson_early": _median(first, "pearson"), "pearson_later": _median(later, "pearson"),
        "spearman": _median(ok, "spearman"),
        "rel_rmse": _median(ok, "rel_rmse"), "rel_rmse_early": _median(first, "rel_rmse"), "rel_rmse_later": _median(later, "rel_rmse"),
        "efficiency_gap": _median(ok, "efficiency_gap"),
        "unfaithful": sum(bool(r["flagged"]) for r in ok),
        "seconds": float(sum(r["seconds_gradients"] + r["seconds_game"] for r in rows)),
        "worst": min(ok, key=lambda r: r["pearson"] if np.isfinite(r["pearson"]) else np.inf) if ok else None,
    }


def table(runs: Mapping[str, tuple[Sequence[Mapping[str, Any]], float]], early: int = EARLY) -> str:
    """Markdown table: one line per valued run (``label -> (audit rows, seconds the run took)``)."""
    head = [
        "valued run", "audited steps (players)", f"Pearson: median (steps ≤ {early} / later)", "Spearman",
        f"relative RMSE: median (steps ≤ {early} / later)", "efficiency gap", "unfaithful steps",
        "audit time (share of the run)",
    ]
    body = []
    for label, (rows, seconds) in runs.items():
        n = numbers(rows, early)
        players = "/".join(map(str, n["players"])) or "–"
        body.append([
            label, f"{n['steps']} ({players})",
            f"{common.fmt(n['pearson'])} ({common.fmt(n['pearson_early'])} / {common.fmt(n['pearson_later'])})",
            common.fmt(n["spearman"]),
            f"{common.fmt(n['rel_rmse'])} ({common.fmt(n['rel_rmse_early'])} / {common.fmt(n['rel_rmse_later'])})",
            f"{n['efficiency_gap']:+.3f}" if np.isfinite(n["efficiency_gap"]) else "–",
            f"{n['unfaithful']} of {n['steps']}",
            f"{n['seconds']:.0f} s ({n['seconds'] / seconds:.0%})" if seconds else f"{n['seconds']:.0f} s",
        ])
    return common.table(head, body)


def sentence(label: str, rows: Sequence[Mapping[str, Any]], early: int = EARLY) -> str:
    """One sentence for a verdict: how faithful the run's values were, as the audit measured."""
    n = numbers(rows, early)
    if not n["steps"]:
        return f"{label}: not audited."
    return (
        f"{label}: median Pearson {common.fmt(n['pearson'], 2)} with the exact Shapley values over {n['steps']} "
        f"audited steps ({common.fmt(n['pearson_early'], 2)} at steps ≤ {early}, {common.fmt(n['pearson_later'], 2)} "
        f"later), median relative RMSE {common.fmt(n['rel_rmse'], 2)}, unfaithful at {n['unfaithful']} of {n['steps']}"
    )


def per_step(rows: Sequence[Mapping[str, Any]]) -> str:
    """Compact per-step list ``step: r`` of one run (for a study's own page)."""
    return ", ".join(f"{r['step']}: {r['pearson']:.2f}" for r in _ok(rows))
