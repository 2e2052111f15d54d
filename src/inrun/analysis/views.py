"""Views of a run's values: other ways to read the same ledger. They are *views*, not the value.

The value of an example is the paper's plain sum over the steps it was in, ``φ_z = Σ_t φ_{z,t}``
(:meth:`inrun.InRunShapley.values`). Early steps, with large gradients and learning rates, carry
most of that sum (docs/case-studies.md, study 2). The views below answer the questions the field
asks of the same per-step numbers, and say in their names that they are views:

* :func:`step_normalized`: each step's values divided by the magnitude of that step's total,
  ``Σ_t φ_{z,t} / |Σ_{z'∈B_t} φ_{z',t}|``: every step weighs alike (the GhostSuite author's
  suggestion for iteration-independent scores). Not a Shapley value of any one game.
* :func:`window_values`: the sum over a window of steps ``[start, stop)``: the value for the
  utility of those steps alone (still a Shapley value, of the window's game).
* :func:`source_stages`: per data source and stage of training, the sum of its examples' values
  (optionally the paper's Fig. 3 share: of the stage's positive source totals).
* :func:`audit_frames`: the audit's rows (exact Shapley values of sampled steps) as tables.

Every view needs the per-step trace (``keep_trace=True``; ``values.trace = true`` in a run
config). Each takes a :class:`~inrun.ValueLedger`, an :class:`~inrun.InRunShapley`, or a run
directory, and returns a ``pandas.DataFrame``.

Example:
    >>> from inrun import views                                  # doctest: +SKIP
    >>> views.step_normalized("runs/demo").head()                # doctest: +SKIP
    >>> views.source_stages(tracker, stages=4, share=True)       # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LedgerError
from ..store.auditlog import AuditLog
from ..store.ledger import ValueLedger
from ..store.rundir import RunDir
from ..store.summary import value_frame

NO_SOURCE = "(no source)"
TINY = 1e-30


def trace_frame(source: Any) -> Any:
    """``pandas.DataFrame`` of the per-step trace: step, id, first_order, second_order, value, source.

    Raises:
        LedgerError: the run kept no per-step trace.
    """
    import pandas as pd

    if isinstance(source, (str, os.PathLike)):
        rd = RunDir(source)
        tr = rd.ledger().trace()
        if tr is None:
            raise LedgerError(f"{rd.path} has no per-step trace (values.trace = false): views need it")
        trace = pd.DataFrame({k: tr[k] for k in ("step", "id", "first_order", "second_order")})
        frame = value_frame(rd)
        sources = dict(zip(frame["id"], frame["source"]))
    else:
        ledger = _ledger(source)
        tr = ledger.trace()
        if tr is None:
            raise LedgerError("this ledger kept no per-step trace: make the tracker with keep_trace=True")
        trace = pd.DataFrame({k: tr[k] for k in ("step", "id", "first_order", "second_order")})
        table = ledger.values()
        sources = {i: s for i, s in zip(table.ids(), table.sources) if s is not None}
    trace = trace[["step", "id", "first_order", "second_order"]].copy()
    trace["value"] = trace["first_order"] + trace["second_order"]
    trace["source"] = trace["id"].map(sources).fillna(NO_SOURCE)
    return trace


def step_normalized(source: Any) -> Any:
    """A view: per example ``Σ_t φ_{z,t} / |Σ_{z'∈B_t} φ_{z',t}|``, every step weighing alike.

    Columns: id, normalized (the view), value (the plain sum, for comparison), count, source;
    sorted by the view, highest first. A step whose values sum to exactly zero contributes zero.
    """
    trace = trace_frame(source)
    totals = trace.groupby("step")["value"].transform("sum").abs()
    trace = trace.assign(normalized=np.where(totals > TINY, trace["value"] / np.maximum(totals, TINY), 0.0))
    out = trace.groupby("id", sort=False).agg(
        normalized=("normalized", "sum"), value=("value", "sum"), count=("value", "size"), source=("source", "first"),
    ).reset_index()
    return out.sort_values("normalized", ascending=False, kind="stable").reset_index(drop=True)


def window_values(source: Any, start: int, stop: int | None = None) -> Any:
    """A view: per example the sum of its values over the steps ``start <= t < stop`` (to the end
    if ``stop`` is ``None``). Columns: id, value, count, source; highest first."""
    if start < 0 or (stop is not None and stop <= start):
        raise ValueError(f"window [{start}, {stop}) is empty or negative: give 0 <= start < stop")
    trace = trace_frame(source)
    inside = trace[(trace["step"] >= start) & ((trace["step"] < stop) if stop is not None else True)]
    out = inside.groupby("id", sort=False).agg(
        value=("value", "sum"), count=("value", "size"), source=("source", "first"),
    ).reset_index()
    return out.sort_values("value", ascending=False, kind="stable").reset_index(drop=True)


def source_stages(source: Any, stages: int = 4, *, steps: int | None = None, share: bool = False) -> Any:
    """A view: per data source (rows) and stage of training (columns ``"a–b"``, equal numbers of
    steps), the sum of its examples' values in that stage.

    Args:
        stages: how many stages.
        steps: the run's length (default: the last traced step + 1).
        share: instead of sums, the paper's Fig. 3 share: a source's total over the sum of the
            positive source totals of the stage (NaN where the source's total is negative).
    """
    import pandas as pd

    trace = trace_frame(source)
    total = int(steps if steps is not None else (trace["step"].max() + 1 if len(trace) else 0))
    stages = max(1, min(stages, total)) if total else 1
    edges = np.linspace(0, total, stages + 1).round().astype(int)
    stage = np.clip(np.searchsorted(edges, trace["step"].to_numpy(), side="right") - 1, 0, stages - 1)
    table = trace.assign(stage=stage).pivot_table(index="source", columns="stage", values="value", aggfunc="sum",
                                                 fill_value=0.0).reindex(columns=range(stages), fill_value=0.0)
    if share:
        positive = table.where(table > 0, 0.0).sum(axis=0)
        table = table.where(table > 0) / positive.where(positive > 0)
    table.columns = [f"{edges[k]}–{edges[k + 1] - 1}" for k in range(stages)]
    order = trace.groupby("source")["value"].sum().sort_values(ascending=False).index
    return pd.DataFrame(table).loc[[s for s in order if s in table.index]]


def audit_frames(source: Any) -> tuple[Any, Any]:
    """The audit's ``(steps, values)`` tables (see :mod:`inrun.tracking.audit.game` for the columns),
    from a tracker made with ``audit=`` or a run directory. Raises :class:`LedgerError` if none."""
    if isinstance(source, (str, os.PathLike)):
        log = RunDir(Path(source)).audit()
        if log is None:
            raise LedgerError(f"{source} holds no audit ([audit] enabled = false, or no audited step yet)")
        return log.frames()
    audit = getattr(source, "audit", None)
    if audit is None:
        raise LedgerError("this tracker was made without an audit: pass audit=... to InRunShapley")
    return AuditLog(audit.steps, audit.values, audit.config).frames()


def _ledger(source: Any) -> ValueLedger:
    if isinstance(source, ValueLedger):
        return source
    ledger = getattr(source, "ledger", None)
    if isinstance(ledger, ValueLedger):
        if hasattr(source, "flush"):
            source.flush()
        return ledger
    raise TypeError(f"expected a ValueLedger, an InRunShapley or a run directory, got {type(source).__name__}")
