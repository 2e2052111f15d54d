"""Each step's drop and the carried values of a run, on disk.

``drops.parquet``: one row per optimizer step the tracker saw (the columns of
:data:`inrun.tracking.drop.DROP_COLUMNS`: ``L(θ_t)``, ``L(θ_t + f(0))``, ``L(θ_t+1)``, the data-free
part, the step game's utility, Σ values, the Taylor remainder, the efficiency, its flag, the carry
credited to the step's batch). ``carried.parquet`` (``carry="momentum"`` only): id, the carried
value, the number of steps that carried it. Both numbers only, written atomically, listed with
their SHA-256 in the run's manifest and verified on read (:meth:`inrun.store.rundir.RunDir.drops`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import LedgerError
from ..files import atomic_write
from ..tracking.drop import DROP_COLUMNS

DROPS_FILE = "drops.parquet"
CARRIED_FILE = "carried.parquet"
_INTS = {"step"}
_STRINGS = {"status", "nonlinear", "flag", "carry_cut"}


def save_drops(directory: str | os.PathLike, rows: Sequence[Mapping[str, Any]], fsync: bool = True) -> Path:
    """Write drop rows as ``drops.parquet`` in ``directory``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    def kind(c: str) -> Any:
        return pa.int64() if c in _INTS else pa.string() if c in _STRINGS else pa.float64()

    table = pa.table({c: pa.array([r[c] for r in rows], type=kind(c)) for c in DROP_COLUMNS})
    path = Path(directory) / DROPS_FILE
    atomic_write(path, lambda p: pq.write_table(table, p), fsync=fsync, sync_dir=False)
    return path


def load_drops(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``drops.parquet`` (NaN where a loss was not measured)."""
    import pyarrow.parquet as pq

    columns = pq.read_table(path).to_pydict()
    missing = [c for c in DROP_COLUMNS if c not in columns]
    if missing:
        raise LedgerError(f"{path} lacks the columns {missing}")
    n = len(columns["step"])
    return [{c: (math.nan if columns[c][k] is None else columns[c][k]) for c in DROP_COLUMNS} for k in range(n)]


def save_carried(directory: str | os.PathLike, table: Any, fsync: bool = True) -> Path:
    """Write a carried table (:meth:`inrun.InRunShapley.carried`) as ``carried.parquet``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = table.ids()
    id_type = pa.string() if any(isinstance(i, str) for i in ids) else pa.int64()
    data = pa.table({"id": pa.array([str(i) if id_type == pa.string() else i for i in ids], type=id_type),
                     "carried": pa.array(table.value, type=pa.float64()),
                     "steps": pa.array(table.counts, type=pa.int64())})
    path = Path(directory) / CARRIED_FILE
    atomic_write(path, lambda p: pq.write_table(data, p), fsync=fsync, sync_dir=False)
    return path


def load_carried(path: str | os.PathLike) -> Any:
    """``carried.parquet`` as a ``pandas.DataFrame`` (id, carried, steps)."""
    import pandas as pd

    return pd.read_parquet(path)
