"""The audit's rows on disk: ``audit.parquet`` (one row per audited step), ``audit_values.parquet``
(one row per audited example) and ``audit.json`` (its settings, with the checksum of its own
content), next to the values of a run. Numbers and ids only, written atomically; what the
columns mean is in :mod:`inrun.tracking.audit.game`. In a run directory the Parquet files are listed
with their SHA-256 in the manifest and verified on read (:meth:`inrun.store.rundir.RunDir.audit`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import LedgerError
from ..files import atomic_write, read_json, write_json
from ..tracking.audit.config import STEP_COLUMNS, VALUE_COLUMNS, AuditConfig
from ..tracking.audit.game import audit_summary
from ..tracking.audit.step import StepAudit

AUDIT_FILE = "audit.parquet"
AUDIT_VALUES_FILE = "audit_values.parquet"
AUDIT_META_FILE = "audit.json"


@dataclass
class AuditLog:
    """An audit read back: per-step and per-example rows (plain dicts) and its settings."""

    steps: list[dict[str, Any]]
    values: list[dict[str, Any]]
    config: AuditConfig | None

    def summary(self) -> dict[str, Any]:
        """Headline numbers (see :func:`inrun.tracking.audit.game.audit_summary`)."""
        return audit_summary(self.steps, self.config)

    def frames(self) -> tuple[Any, Any]:
        """``(steps, values)`` as ``pandas.DataFrame``s."""
        import pandas as pd

        return (pd.DataFrame(self.steps, columns=list(STEP_COLUMNS)),
                pd.DataFrame(self.values, columns=list(VALUE_COLUMNS)))


AUDIT_FILES = (AUDIT_FILE, AUDIT_VALUES_FILE, AUDIT_META_FILE)


def save_audit(directory: str | os.PathLike, audit: StepAudit | AuditLog, fsync: bool = True) -> None:
    """Write an audit's rows into ``directory`` (Parquet) with its settings (``audit.json``)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    directory = Path(directory)
    if isinstance(audit, StepAudit):
        state = audit.state()
        steps, values, config = state["steps"], state["values"], audit.config
    else:
        steps, values, config = audit.steps, audit.values, audit.config
    step_types, value_types = _types()
    step_table = pa.table({c: pa.array([r[c] for r in steps], type=step_types[c]) for c in STEP_COLUMNS})
    value_types["id"] = pa.string() if any(isinstance(r["id"], str) for r in values) else pa.int64()
    value_table = pa.table({c: pa.array([r[c] for r in values], type=value_types[c]) for c in VALUE_COLUMNS})
    atomic_write(directory / AUDIT_FILE, lambda p: pq.write_table(step_table, p), fsync=fsync)
    atomic_write(directory / AUDIT_VALUES_FILE, lambda p: pq.write_table(value_table, p), fsync=fsync)
    meta = {"format": 1, "config": None if config is None else config.to_dict()}
    write_json(directory / AUDIT_META_FILE, meta, fsync=fsync)


def load_audit(directory: str | os.PathLike) -> AuditLog | None:
    """The audit saved in ``directory``, or ``None`` if the run had none."""
    import pyarrow.parquet as pq

    directory = Path(directory)
    if not (directory / AUDIT_FILE).exists():
        return None
    meta_path = directory / AUDIT_META_FILE
    meta = read_json(meta_path, "the audit's settings") if meta_path.exists() else {"format": 1, "config": None}
    if meta.get("format") != 1:
        raise LedgerError(f"{meta_path}: unknown audit format {meta.get('format')!r}")
    steps = _rows(pq.read_table(directory / AUDIT_FILE).to_pydict(), STEP_COLUMNS)
    values_path = directory / AUDIT_VALUES_FILE
    values = _rows(pq.read_table(values_path).to_pydict(), VALUE_COLUMNS) if values_path.exists() else []
    config = AuditConfig.of(meta["config"]) if meta.get("config") else None
    return AuditLog(steps, values, config)


LATER_COLUMNS = ("game", "noise", "data_free", "step_utility", "step_values")
"""Step columns that audits written before the full-game audit lack (read as unknown)."""


def _rows(columns: Mapping[str, Sequence[Any]], names: Sequence[str]) -> list[dict[str, Any]]:
    missing = [c for c in names if c not in columns and c not in LATER_COLUMNS]
    if missing:
        raise LedgerError(f"audit table lacks columns {missing}")
    n = len(columns[names[0]])
    rows = [{c: _nan(columns[c][k]) for c in names if c in columns} for k in range(n)]
    for r in rows:
        for c in names:
            if c not in r:
                r[c] = ("full" if r["players"] == r["batch"] else "sub") if c == "game" else math.nan
    return rows


def _nan(x: Any) -> Any:
    return math.nan if x is None else x


def _types() -> tuple[dict[str, Any], dict[str, Any]]:
    import pyarrow as pa

    ints = {"step", "players", "batch", "order", "evaluations"}
    strs = {"status", "reason", "method", "variant", "rule", "game"}
    steps = {c: pa.int64() if c in ints else pa.string() if c in strs else pa.bool_() if c == "flagged" else pa.float64()
             for c in STEP_COLUMNS}
    values = {c: pa.int64() if c == "step" else pa.float64() for c in VALUE_COLUMNS if c != "id"}
    return steps, values

