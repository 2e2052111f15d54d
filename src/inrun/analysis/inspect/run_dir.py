"""``inrun inspect RUN_DIR``: a finished (or running) run on one screen: its values, its audit
(how faithful the values are, and what checking cost), and the views of its ledger."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ...store.rundir import RunDir
from ...store.summary import packed_line, summarize, unit
from ...tracking.drop import EFFICIENCY_BAND, by_stage
from .. import views


def is_run_dir(target: str | Path) -> bool:
    return (Path(target) / "run.json").is_file()


def audit_line(summary: dict[str, Any] | None, run_seconds: float | None) -> str:
    """One sentence about a run's audit (what the CLI prints at the end of a run)."""
    if summary is None:
        return "Audit: off ([audit] enabled = false): nothing checks how close these values are to exact Shapley values."
    if not summary["audited_steps"]:
        refused = f" ({summary['refused_steps']} refused)" if summary["refused_steps"] else ""
        return f"Audit: no step audited yet{refused}."
    if summary.get("full_games") == summary["audited_steps"]:
        players = f"each step's full game, all {summary.get('players')} examples"
    elif summary.get("full_games") is None:  # an audit written before the full game
        players = f"{(summary.get('config') or {}).get('players')} examples each"
    else:
        players = (f"sub-games of {summary.get('players')} of {summary.get('batch')} examples: optimistic; the "
                   "steps' own U_t(B) beside each in inspect")
    flagged = summary["flagged_steps"]
    verdict = f"unfaithful at step(s) {', '.join(map(str, flagged))}" if flagged else "no step unfaithful"
    cost = f"{summary['seconds']:.0f} s"
    if run_seconds:
        cost += f" = {summary['seconds'] / run_seconds:.0%} of the run's time"
    return (
        f"Audit: {summary['audited_steps']} step(s) checked against exact Shapley values "
        f"({players}): median Pearson {summary['median_pearson']:.3f} (worst "
        f"{summary['worst_pearson']:.3f} at step {summary['worst_step']}), median relative RMSE "
        f"{summary['median_rel_rmse']:.3f}; {verdict}. Cost {cost} ({summary['evaluations']:,} utility evaluations)."
    )


def drop_line(drop: dict[str, Any] | None) -> str:
    """One sentence: the run's measured drop decomposed (``summary.json``'s ``drop``)."""
    if drop is None:
        return "Drop: this run recorded no per-step drop (written by an inrun before the drop rows)."
    return "Drop: " + drop["headline"]


def inspect_run(
    target: str | Path, console: Console, top: int = 5, stages: int = 4, window: tuple[int, int | None] | None = None,
) -> None:
    """Print a run's values, audit and views."""
    rd = RunDir(target)
    meta = rd.meta()
    summary = summarize(rd, top=top)
    cfg = meta.get("config", {})
    opt, values = cfg.get("optimizer", {}), cfg.get("values", {})
    console.print(
        f"[bold]{escape(str(rd.path))}[/]: {summary['state']}, {summary['steps']:,} steps; "
        f"{escape(str(opt.get('name', '?')))} lr {opt.get('lr', '?')}, value order {values.get('order', 1)}; "
        f"{summary['examples_valued']:,} of {summary['examples']:,} {unit(summary)} valued, "
        f"{summary['negative_share']:.1%} negative; validation loss {summary['val_loss_first']:.4g} -> "
        f"{summary['val_loss_final']:.4g}."
    )
    if summary.get("packed"):
        console.print(escape(packed_line(summary) + "."))
    console.print(escape(drop_line(summary.get("drop"))), soft_wrap=True)
    drops = rd.drops()
    if drops:
        _drop_table(console, drops, stages)
    audit = rd.audit()
    console.print(audit_line(None if audit is None else audit.summary(), summary.get("seconds")), soft_wrap=True)
    if audit is not None and audit.steps:
        table = Table(title="Audited steps: the tracker's values against the exact Shapley values of the step's "
                      "game (enumerated, or Monte Carlo with its noise); beside: what the game cannot see "
                      "(D_t) and the whole step (U_t(B), Σ values)", title_justify="left")
        for col in ("step", "players", "Pearson", "rel. RMSE", "noise", "gap", "D_t", "U_t(B)", "Σφ", "s", ""):
            table.add_column(col, justify="right")
        for r in audit.steps:
            if r["status"] != "ok":
                table.add_row(str(r["step"]), "", escape(r["status"]), *[""] * 7, escape(r["reason"][:40]))
                continue
            table.add_row(
                str(r["step"]), f"{r['players']}/{r['batch']}", _f(r["pearson"]), _f(r["rel_rmse"], ".2f"),
                _f(r["noise"]), _f(r["efficiency_gap"], "+.2f"), _f(r["data_free"], "+.1e"),
                _f(r["step_utility"], "+.1e"), _f(r["step_values"], "+.1e"),
                f"{r['seconds_gradients'] + r['seconds_game']:.0f}", "[red]unfaithful[/]" if r["flagged"] else "",
            )
        console.print(table)
    if not rd.ledger().keep_trace:
        console.print("Views: this run kept no per-step trace (values.trace = false).")
        return
    previews = _previews(rd)
    normalized = views.step_normalized(rd.path)
    table = Table(title="Step-normalized view (each step's values over |that step's total|): highest and lowest",
                  title_justify="left")
    for col in ("view", "value", "source", "text"):
        table.add_column(col, justify="left" if col in ("source", "text") else "right", no_wrap=True,
                         overflow="ellipsis", max_width=None if col != "text" else max(16, console.width - 48))
    for _, r in [*normalized.head(top).iterrows(), *normalized.tail(top).iloc[::-1].iterrows()]:
        table.add_row(f"{r['normalized']:+.3e}", f"{r['value']:+.2e}", escape(str(r["source"])),
                      escape(previews.get(r["id"], "")))
    console.print(table)
    by_stage = views.source_stages(rd.path, stages=stages, steps=summary["steps"] or None)
    table = Table(title="Value per source and stage (sums of the plain values)", title_justify="left")
    table.add_column("source")
    for c in by_stage.columns:
        table.add_column(f"steps {c}", justify="right")
    for s, row in zip(by_stage.index, by_stage.to_numpy()):
        table.add_row(escape(str(s)), *(f"{v:+.2e}" for v in row))
    console.print(table)
    if window is not None:
        start, stop = window
        w = views.window_values(rd.path, start, stop)
        label = f"steps {start}-{'end' if stop is None else stop - 1}"
        table = Table(title=f"Values over {label} only (a view): highest and lowest", title_justify="left")
        for col in ("value", "seen", "source", "text"):
            table.add_column(col, justify="left" if col in ("source", "text") else "right", no_wrap=True,
                             overflow="ellipsis", max_width=None if col != "text" else max(16, console.width - 40))
        for _, r in [*w.head(top).iterrows(), *w.tail(top).iloc[::-1].iterrows()]:
            table.add_row(f"{r['value']:+.3e}", str(r["count"]), escape(str(r["source"])), escape(previews.get(r["id"], "")))
        console.print(table)


def _drop_table(console: Console, drops: list[dict[str, Any]], stages: int) -> None:
    """The decomposition by stage of training, with each stage's efficiency and steps outside its band."""
    staged = by_stage(drops, stages)
    untracked = " + untracked" if any(d.untracked for _, d in staged) else ""
    table = Table(title=f"The drop by stage: measured = games Σ U_t + momentum and decay Σ D_t{untracked}; "
                  f"Σ U_t = Σ values + remainder; steps whose Σ values / U_t leaves "
                  f"{EFFICIENCY_BAND[0]:g}-{EFFICIENCY_BAND[1]:g} are out of the band", title_justify="left")
    for col in ("steps", "drop", "Σ D_t", "Σ U_t", "Σ values", "remainder", "values/U", "out", "left out"):
        table.add_column(col, justify="right")
    for label, d in staged:
        table.add_row(label, f"{d.measured:+.3f}", f"{d.data_free:+.3f}", f"{d.utility:+.3f}", f"{d.values:+.3f}",
                      f"{d.remainder:+.3f}", _f(d.explained, ".0%"), str(d.flagged), ", ".join(map(str, d.left_out)))
    console.print(table)


def parse_window(text: str | None) -> tuple[int, int | None] | None:
    """``"A:B"`` (steps A to B−1) or ``"A:"`` (A to the end) as ``(A, B or None)``."""
    if text is None:
        return None
    start, sep, stop = text.partition(":")
    try:
        a = int(start)
        b = int(stop) if stop.strip() else None
    except ValueError:
        raise ValueError(f"--window {text!r}: expected START:STOP (steps START to STOP-1) or START:") from None
    if not sep or a < 0 or (b is not None and b <= a):
        raise ValueError(f"--window {text!r}: expected START:STOP with 0 <= START < STOP, or START:")
    return a, b


def _previews(rd: RunDir) -> dict[Any, str]:
    frame = rd.examples()
    return {i: " ".join(str(p).split()) for i, p in zip(frame["id"], frame["preview"])} if len(frame) else {}


def _f(x: float, fmt: str = ".3f") -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)
