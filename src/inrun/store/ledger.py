"""Values by example id, accumulated over the steps of a run; saved to and loaded from Parquet.

Every appearance of an example adds its step value (the paper's plain sum over iterations, no
normalization) and increments its count. Values are float64 on the host. The first-order part
and the second-order correction are kept apart so both can be reported. Optionally a per-step
trace (step, lr, id, both parts) and a per-(train, validation) table are kept.

A saved ledger is a directory (:meth:`ValueLedger.save`)::

    values.parquet           id, value, first_order, second_order, count, source
    per_validation.parquet   id and one column per validation example (vector val_loss only)
    trace/part-A-B.parquet   trace rows of steps A..B: step, lr, id, first_order, second_order
    ledger.json              steps, skipped steps, and the SHA-256 and size of every file above

Every file is written atomically and flushed to disk; ``ledger.json`` is written last and
checks itself, and :meth:`ValueLedger.load` refuses a file whose bytes are not the ones
listed, so damage is an error, never different values. Only ids and numbers: no pickles.

**The trace is appended, not rewritten.** With a ``trace_dir`` (``inrun train`` gives the run
directory's ``trace/``), rows are kept in memory only until the next save, or until
``spill_rows`` of them are waiting; they are then written once as a new part file there, and
later saves link (hard links, else copies) the finished parts into the target directory. So
memory is bounded and a checkpoint writes only the rows since the previous one. Without a
``trace_dir`` the trace stays in memory and each save writes it as one part.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LedgerError
from ..files import (
    IntegrityError,
    atomic_write,
    file_digest,
    fsync_dir,
    link_or_copy,
    read_json,
    verify_file,
    write_json,
)
from ..tracking.admission import Id

VALUES_FILE = "values.parquet"
PER_VALIDATION_FILE = "per_validation.parquet"
TRACE_FILE = "trace.parquet"  # format 1 (one file, rewritten at every save)
TRACE_DIR = "trace"
LEDGER_FORMAT = 2
LEDGER_META_FILE = "ledger.json"


class ValueTable(Mapping):
    """Read-only mapping id -> accumulated value (float64), with a few conveniences.

    Example:
        >>> values = tracker.values()          # doctest: +SKIP
        >>> values[17], values.count(17)       # doctest: +SKIP
        >>> values.top(10), values.to_pandas() # doctest: +SKIP
    """

    def __init__(
        self,
        ids: Sequence[Id],
        value: np.ndarray,
        first_order: np.ndarray,
        second_order: np.ndarray,
        count: np.ndarray,
        sources: Sequence[str | None],
    ) -> None:
        self._ids = list(ids)
        self._index = {i: r for r, i in enumerate(self._ids)}
        self.value = value
        self.first_order = first_order
        self.second_order = second_order
        self.counts = count
        self.sources = list(sources)

    def __getitem__(self, key: Id) -> float:
        return float(self.value[self._index[key]])

    def __iter__(self) -> Iterator[Id]:
        return iter(self._ids)

    def __len__(self) -> int:
        return len(self._ids)

    def __repr__(self) -> str:
        return f"ValueTable({len(self)} examples, total={self.value.sum():.6g})"

    def count(self, key: Id) -> int:
        """How many times the example was in a valued step."""
        return int(self.counts[self._index[key]])

    def ids(self) -> list[Id]:
        return list(self._ids)

    def top(self, k: int = 10) -> list[tuple[Id, float]]:
        """The ``k`` most helpful examples, highest value first."""
        order = np.argsort(-self.value, kind="stable")[:k]
        return [(self._ids[r], float(self.value[r])) for r in order]

    def bottom(self, k: int = 10) -> list[tuple[Id, float]]:
        """The ``k`` most harmful examples, lowest value first."""
        order = np.argsort(self.value, kind="stable")[:k]
        return [(self._ids[r], float(self.value[r])) for r in order]

    def to_pandas(self) -> Any:
        """``pandas.DataFrame``: id, value, first_order, second_order, count, source."""
        import pandas as pd

        return pd.DataFrame(
            {
                "id": self._ids,
                "value": self.value,
                "first_order": self.first_order,
                "second_order": self.second_order,
                "count": self.counts,
                "source": self.sources,
            }
        )

    def to_arrow(self) -> Any:
        """``pyarrow.Table`` with the columns of :meth:`to_pandas` (ids keep their type)."""
        import pyarrow as pa

        return pa.table({
            "id": _id_array(self._ids), "value": self.value, "first_order": self.first_order,
            "second_order": self.second_order, "count": self.counts,
            "source": pa.array(self.sources, type=pa.string()),
        })

    def to_parquet(self, path: str | os.PathLike) -> Path:
        """Write the table as one Parquet file (atomically); returns its path."""
        import pyarrow.parquet as pq

        table = self.to_arrow()
        atomic_write(path, lambda p: pq.write_table(table, p))
        return Path(path)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the table as CSV (atomically): values with 17 significant digits, so they read
        back as the same float64 numbers; returns its path."""
        frame = self.to_pandas()
        atomic_write(path, lambda p: frame.to_csv(p, index=False, float_format="%.17g"))
        return Path(path)

    def to_dataset(self, dataset: Any, id_column: str = "id", column: str = "inrun_value",
                   count_column: str | None = "inrun_count") -> Any:
        """``dataset`` (a ``datasets.Dataset``) with the values as a new column, matched by id.

        Examples never valued get ``NaN`` (and count 0). The dataset is not changed: a new one
        is returned, as ``datasets`` does.

        Args:
            id_column: the dataset's column of example ids (the ids given to ``tracker.step``).
            column: name of the new value column.
            count_column: name of a column with how often each example was valued (``None``: none).

        Raises:
            KeyError: the dataset has no ``id_column``, or already has ``column``.
        """
        names = getattr(dataset, "column_names", None)
        if names is None:
            raise TypeError(f"to_dataset takes a datasets.Dataset, got {type(dataset).__name__}; for a table use to_pandas()")
        if id_column not in names:
            raise KeyError(f"the dataset has no {id_column!r} column (it has {names}); pass id_column=")
        for c in (column, count_column):
            if c is not None and c in names:
                raise KeyError(f"the dataset already has a {c!r} column; pass another column= name")
        ids = dataset[id_column]
        rows = [self._index.get(int(i) if isinstance(i, np.integer) else i) for i in ids]
        values = [float(self.value[r]) if r is not None else float("nan") for r in rows]
        out = dataset.add_column(column, values)
        if count_column is not None:
            out = out.add_column(count_column, [int(self.counts[r]) if r is not None else 0 for r in rows])
        return out


class PerValidation(tuple):
    """Per-(train, validation) values: ``values[i, k]`` is training example ``ids[i]``'s value for
    validation example ``validation[k]``; they add up over ``k`` to the example's value.

    It is the ``(ids, values)`` pair :meth:`ValueLedger.per_validation` always returned (so
    ``ids, matrix = tracker.per_validation()`` still works), with labels and a table form.
    """

    ids: list
    values: np.ndarray
    validation: list[str]

    def __new__(cls, ids: Sequence[Id], values: np.ndarray, validation: Sequence[str]) -> PerValidation:
        obj = super().__new__(cls, (list(ids), values))
        obj.ids, obj.values, obj.validation = list(ids), values, list(validation)
        return obj

    def __getnewargs__(self) -> tuple[Any, ...]:  # pickling (DDP gathers, multiprocessing)
        return (self.ids, self.values, self.validation)

    def to_pandas(self) -> Any:
        """``pandas.DataFrame``: index the training ids (``"id"``), one column per validation example."""
        import pandas as pd

        return pd.DataFrame(self.values, index=pd.Index(self.ids, name="id"),
                            columns=pd.Index(self.validation, name="validation"))

    def column(self, validation: str) -> dict[Id, float]:
        """id -> value for one validation example."""
        k = self.validation.index(str(validation))
        return {i: float(v) for i, v in zip(self.ids, self.values[:, k])}

    def __repr__(self) -> str:
        return f"PerValidation({len(self.ids)} training x {len(self.validation)} validation examples)"


@dataclass(frozen=True)
class TracePart:
    """One finished trace file: ``rows`` rows of steps ``first..last``, at ``path`` now."""

    name: str  # relative to a ledger directory: trace/part-A-B.parquet
    path: Path
    sha256: str
    size: int
    rows: int
    first: int
    last: int

    def entry(self) -> dict[str, Any]:
        return {"file": self.name, "sha256": self.sha256, "size": self.size, "rows": self.rows,
                "first_step": self.first, "last_step": self.last}


def _part_name(first: int, last: int) -> str:
    return f"{TRACE_DIR}/part-{first:09d}-{last:09d}.parquet"


class ValueLedger:
    """Accumulates step values by example id.

    Args:
        keep_trace: also keep one row per (step, example) with the step's learning rate.
        trace_dir: where finished trace parts are written (see the module docstring); ``None``
            keeps the whole trace in memory.
        spill_rows: with a ``trace_dir``, write a part once this many rows are waiting.
    """

    SPILL_ROWS = 1 << 18  # 10 MiB of trace rows in memory at most

    def __init__(
        self, keep_trace: bool = False, trace_dir: str | os.PathLike | None = None, spill_rows: int | None = None
    ) -> None:
        self.keep_trace = keep_trace
        self.trace_dir = Path(trace_dir) if trace_dir is not None else None
        self.spill_rows = int(spill_rows or self.SPILL_ROWS)
        self._index: dict[Id, int] = {}
        self._ids: list[Id] = []
        self._sources: list[str | None] = []
        self._first = np.zeros(0, dtype=np.float64)
        self._second = np.zeros(0, dtype=np.float64)
        self._count = np.zeros(0, dtype=np.int64)
        self._per_val: np.ndarray | None = None
        self.validation_names: list[str] | None = None
        self._trace: list[dict[str, np.ndarray]] = []  # rows not yet in a part
        self._trace_rows = 0
        self._parts: list[TracePart] = []
        self._undo: dict[str, Any] | None = None
        self.skipped: list[dict[str, Any]] = []
        self.steps = 0
        self.group_lrs: dict[int, list[float]] = {}
        """Step -> the learning rate of every parameter group, for optimizers with several groups
        (the trace's ``lr`` column is the first group's)."""

    # -- accumulation -------------------------------------------------------------------------
    def _rows(self, ids: Sequence[Id]) -> np.ndarray:
        rows = np.empty(len(ids), dtype=np.int64)
        for k, i in enumerate(ids):
            r = self._index.get(i)
            if r is None:
                r = len(self._ids)
                self._index[i] = r
                self._ids.append(i)
                self._sources.append(None)
            rows[k] = r
        self._grow(len(self._ids))
        return rows

    def _grow(self, n: int) -> None:
        cap = self._first.shape[0]
        if n <= cap:
            return
        new = max(n, 2 * cap, 1024)

        def grow(a: np.ndarray) -> np.ndarray:
            b = np.zeros((new, *a.shape[1:]), dtype=a.dtype)
            b[: a.shape[0]] = a
            return b

        self._first, self._second, self._count = grow(self._first), grow(self._second), grow(self._count)
        if self._per_val is not None:
            self._per_val = grow(self._per_val)

    def add(
        self,
        step: int,
        ids: Sequence[Id],
        first_order: np.ndarray,
        second_order: np.ndarray | None = None,
        lr: float | Sequence[float] | None = None,
    ) -> None:
        """Add one step's values.

        Args:
            step: the optimizer step (0-based) the values belong to.
            ids: one id per row.
            first_order: ``[B, K]`` first-order values per validation column (``K = 1``: summed).
            second_order: ``[B, K]`` second-order corrections, or ``None``.
            lr: the step's learning rate, or one per parameter group (the trace's ``lr`` column
                has the first; with several, all are kept in :attr:`group_lrs`).
        """
        if lr is not None and not isinstance(lr, (int, float)):
            lrs = [float(x) for x in lr]
            if len(lrs) > 1 and self.keep_trace:
                self.group_lrs[int(step)] = lrs
            lr = lrs[0] if lrs else None
        first = np.asarray(first_order, dtype=np.float64)
        second = (
            np.zeros_like(first) if second_order is None else np.asarray(second_order, np.float64)
        )
        if first.ndim != 2 or first.shape[0] != len(ids) or second.shape != first.shape:
            raise LedgerError(
                f"step values must be [batch, columns]; got {first.shape} for {len(ids)} ids"
            )
        if not (np.isfinite(first).all() and np.isfinite(second).all()):
            raise LedgerError(f"non-finite values at step {step}; refusing to add them")
        rows = self._rows(ids)
        K = first.shape[1]
        if K > 1 and self._per_val is not None and self._per_val.shape[1] != K:
            raise LedgerError(
                f"step {step} has {K} validation columns, earlier steps had {self._per_val.shape[1]}"
            )
        if self._undo is not None:
            self._undo["rows"].append((
                rows, self._first[rows], self._second[rows], self._count[rows],
                None if self._per_val is None else self._per_val[rows],
            ))
        if K > 1:
            if self._per_val is None:
                self._per_val = np.zeros((self._first.shape[0], K), dtype=np.float64)
            np.add.at(self._per_val, rows, first + second)
        np.add.at(self._first, rows, first.sum(axis=1))
        np.add.at(self._second, rows, second.sum(axis=1))
        np.add.at(self._count, rows, 1)
        if self.keep_trace:
            self._trace.append(
                {
                    "step": np.full(len(ids), step, dtype=np.int64),
                    "lr": np.full(len(ids), np.nan if lr is None else lr, dtype=np.float64),
                    "row": rows,
                    "first_order": first.sum(axis=1),
                    "second_order": second.sum(axis=1),
                }
            )
            self._trace_rows += len(ids)
            if self._undo is None and self.trace_dir is not None and self._trace_rows >= self.spill_rows:
                self._seal(self.trace_dir)
        self.steps = max(self.steps, step + 1)

    def record_skip(self, step: int, reason: str) -> None:
        """Note a step whose values were not added (NaN loss, skipped optimizer step...)."""
        self.skipped.append({"step": int(step), "reason": reason})
        self.steps = max(self.steps, step + 1)

    def set_sources(self, sources: Mapping[Id, str]) -> None:
        """Attach a data-source label (e.g. a package or domain) to ids, seen or not yet seen."""
        for i, s in sources.items():
            self._rows([i])
            self._sources[self._index[i]] = s

    # -- undoing the last step ------------------------------------------------------------------
    def mark(self) -> None:
        """Remember the ledger as it is now, so that :meth:`rollback` can return to it exactly.

        What is added after the mark is recorded (the old numbers of the rows it touches: a
        batch's worth), so a step found bad afterwards (its update blew up the parameters) can
        be taken out bit for bit, which subtracting it again could not do. A new mark forgets
        the previous one; :meth:`commit` forgets it without a new one.
        """
        if self.trace_dir is not None and self._trace_rows >= self.spill_rows:
            self._seal(self.trace_dir)  # spill before the mark: a rollback never crosses a part
        self._undo = {
            "rows": [], "n_ids": len(self._ids), "trace": len(self._trace), "trace_rows": self._trace_rows,
            "parts": len(self._parts), "skipped": len(self.skipped), "steps": self.steps,
            "per_val": self._per_val is not None,
        }

    def commit(self) -> None:
        """Forget the mark: what was added since is kept for good."""
        self._undo = None

    @property
    def marked(self) -> bool:
        return self._undo is not None

    def rollback(self) -> None:
        """Return to the state of the last :meth:`mark` (exactly: the old numbers are put back)."""
        undo, self._undo = self._undo, None
        if undo is None:
            raise LedgerError("rollback() without a mark(): nothing to return to")
        for rows, first, second, count, per_val in reversed(undo["rows"]):
            self._first[rows], self._second[rows], self._count[rows] = first, second, count
            if per_val is not None and self._per_val is not None:
                self._per_val[rows] = per_val
        n = undo["n_ids"]
        for i in self._ids[n:]:
            del self._index[i]
        del self._ids[n:], self._sources[n:]
        for a in (self._first, self._second, self._count):
            a[n:] = 0
        if not undo["per_val"]:
            self._per_val = None
        elif self._per_val is not None:
            self._per_val[n:] = 0
        del self._trace[undo["trace"]:]
        self._trace_rows = undo["trace_rows"]
        del self._parts[undo["parts"]:]  # (parts are never sealed while a mark is held)
        del self.skipped[undo["skipped"]:]
        self.steps = undo["steps"]
        for step in [s for s in self.group_lrs if s >= self.steps]:
            del self.group_lrs[step]

    # -- reading ------------------------------------------------------------------------------
    def trace_part_names(self) -> list[str]:
        """File names of the finished trace parts (``part-A-B.parquet``), oldest first."""
        return [p.path.name for p in self._parts]

    def __len__(self) -> int:
        return len(self._ids)

    def values(self) -> ValueTable:
        """A snapshot: id -> accumulated value (first order + second-order correction)."""
        n = len(self._ids)
        first, second = self._first[:n].copy(), self._second[:n].copy()
        return ValueTable(self._ids, first + second, first, second, self._count[:n].copy(), self._sources)

    def per_validation(self) -> PerValidation | None:
        """Per-(train, validation) values (:class:`PerValidation`, which unpacks as
        ``(ids, [N, V])``), if the validation loss was a vector; else ``None``."""
        if self._per_val is None:
            return None
        pv = self._per_val[: len(self._ids)].copy()
        names = self.validation_names or [f"val_{k}" for k in range(pv.shape[1])]
        return PerValidation(self._ids, pv, names)

    def trace(self) -> dict[str, np.ndarray] | None:
        """Column arrays of the per-step trace (``keep_trace=True``), ids resolved.

        Parts already on disk are read back (they were verified when written or loaded).
        """
        if not self.keep_trace:
            return None
        cols = ("step", "lr", "first_order", "second_order")
        pieces: list[dict[str, Any]] = [_read_part(p) for p in self._parts]
        pending = self._pending_columns()
        if pending is not None:
            pieces.append(pending)
        if not pieces:
            out: dict[str, Any] = {c: np.zeros(0) for c in cols}
            out["step"] = np.zeros(0, dtype=np.int64)
            out["id"] = np.array([], dtype=object)
            return out
        out = {c: np.concatenate([p[c] for p in pieces]) for c in cols}
        ids = [i for p in pieces for i in p["id"]]
        out["id"] = np.empty(len(ids), dtype=object)
        out["id"][:] = ids
        return out

    def _pending_columns(self) -> dict[str, Any] | None:
        if not self._trace:
            return None
        cols = ("step", "lr", "first_order", "second_order")
        out: dict[str, Any] = {c: np.concatenate([t[c] for t in self._trace]) for c in cols}
        rows = np.concatenate([t["row"] for t in self._trace])
        out["id"] = [self._ids[r] for r in rows]
        return out

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the ledger, as plain lists and arrays (trace included)."""
        n = len(self._ids)
        return {
            "ids": list(self._ids),
            "sources": list(self._sources),
            "first_order": self._first[:n].copy(),
            "second_order": self._second[:n].copy(),
            "count": self._count[:n].copy(),
            "per_validation": None if self._per_val is None else self._per_val[:n].copy(),
            "validation_names": self.validation_names,
            "trace": self.trace(),
            "skipped": list(self.skipped),
            "steps": self.steps,
            "keep_trace": self.keep_trace,
            "group_lrs": dict(self.group_lrs),
        }

    @classmethod
    def from_states(cls, states: Sequence[Mapping[str, Any]]) -> ValueLedger:
        """One ledger from several :meth:`state` dicts (a DDP run's ranks): :func:`merge_states`."""
        return merge_states(states)

    @classmethod
    def from_state(cls, state: Mapping[str, Any], trace_dir: str | os.PathLike | None = None) -> ValueLedger:
        ledger = cls(keep_trace=bool(state.get("keep_trace", False)), trace_dir=trace_dir)
        ledger._set_values(state)
        trace = state.get("trace")
        if ledger.keep_trace and trace is not None and len(trace["step"]):
            ledger._trace.append(
                {
                    "step": np.asarray(trace["step"], dtype=np.int64),
                    "lr": np.asarray(trace["lr"], dtype=np.float64),
                    "row": ledger._rows(list(trace["id"])),
                    "first_order": np.asarray(trace["first_order"], dtype=np.float64),
                    "second_order": np.asarray(trace["second_order"], dtype=np.float64),
                }
            )
            ledger._trace_rows = len(trace["step"])
        return ledger

    def _set_values(self, state: Mapping[str, Any]) -> None:
        ids = list(state["ids"])
        rows = self._rows(ids)
        self._first[rows] = state["first_order"]
        self._second[rows] = state["second_order"]
        self._count[rows] = state["count"]
        self._sources = list(state["sources"])
        if state.get("per_validation") is not None:
            pv = np.asarray(state["per_validation"], dtype=np.float64)
            self._per_val = np.zeros((self._first.shape[0], pv.shape[1]))
            self._per_val[rows] = pv
        self.validation_names = state.get("validation_names")
        self.skipped = list(state.get("skipped", []))
        self.steps = int(state.get("steps", 0))
        self.group_lrs = {int(k): [float(x) for x in v] for k, v in (state.get("group_lrs") or {}).items()}

    def _pending_table(self) -> tuple[Any, int, int]:
        import pyarrow as pa

        cols = self._pending_columns()
        assert cols is not None
        table = pa.table(
            {
                "step": pa.array(cols["step"], type=pa.int64()),
                "lr": pa.array(cols["lr"], type=pa.float64()),
                "id": _id_array(cols["id"]),
                "first_order": pa.array(cols["first_order"], type=pa.float64()),
                "second_order": pa.array(cols["second_order"], type=pa.float64()),
            }
        )
        return table, int(cols["step"].min()), int(cols["step"].max())

    def _write_part(self, trace_dir: Path, fsync: bool = True) -> TracePart:
        """Write the rows not yet in a part as a new part file in ``trace_dir``."""
        import pyarrow.parquet as pq

        table, first, last = self._pending_table()
        name = _part_name(first, last)
        path = trace_dir / Path(name).name
        # The file's bytes are synced (checkpoints hard-link it); its directory entries are
        # synced by whoever lists it (a checkpoint syncs its own directories).
        atomic_write(path, lambda p: pq.write_table(table, p), fsync=fsync, sync_dir=False)
        d = file_digest(path)
        return TracePart(name, path, d["sha256"], d["size"], table.num_rows, first, last)

    def _seal(self, store: Path) -> None:
        """Move the waiting trace rows into a new part in ``store``, for good."""
        if not self._trace:
            return
        self._parts.append(self._write_part(store))
        self._trace.clear()
        self._trace_rows = 0

    def save(self, directory: str | os.PathLike, fsync: bool = True) -> Path:
        """Write ``values.parquet`` (+ per-validation table, trace parts) and ``ledger.json``.

        ``ledger.json`` goes last and lists every file with its SHA-256, so a reader sees either
        a complete save or an error. Trace parts already written are linked, not rewritten.

        Args:
            fsync: flush the files and the directory to disk (``False``: atomic, not durable:
                for copies that can be rewritten from a durable one, as a run's top level is).
        """
        import pyarrow as pa
        import pyarrow.parquet as pq

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        n = len(self._ids)
        first, second = self._first[:n], self._second[:n]
        id_col = _id_array(self._ids)
        table = pa.table(
            {
                "id": id_col,
                "value": first + second,
                "first_order": first,
                "second_order": second,
                "count": self._count[:n],
                "source": pa.array(self._sources, type=pa.string()),
            }
        )
        files: dict[str, dict[str, Any]] = {}
        atomic_write(directory / VALUES_FILE, lambda p: pq.write_table(table, p), fsync=fsync, sync_dir=False)
        files[VALUES_FILE] = file_digest(directory / VALUES_FILE)
        if self._per_val is not None:
            pv = self._per_val[:n]
            names = self.validation_names or [f"val_{k}" for k in range(pv.shape[1])]
            cols = {"id": id_col, **{str(name): pv[:, k] for k, name in enumerate(names)}}
            atomic_write(directory / PER_VALIDATION_FILE, lambda p: pq.write_table(pa.table(cols), p), fsync=fsync, sync_dir=False)
            files[PER_VALIDATION_FILE] = file_digest(directory / PER_VALIDATION_FILE)
        parts: list[dict[str, Any]] = []
        if self.keep_trace:
            if self.trace_dir is not None and self._undo is None:
                self._seal(self.trace_dir)
            for part in self._parts:
                target = directory / part.name
                if not (target.exists() and os.path.samefile(target, part.path)):
                    link_or_copy(part.path, target)
                parts.append(part.entry())
            if self._trace:  # rows not in a part yet (no trace_dir, or a mark is held)
                parts.append(self._write_part(directory / TRACE_DIR, fsync=fsync).entry())
        meta = {
            "format": LEDGER_FORMAT,
            "steps": self.steps,
            "skipped": self.skipped,
            "keep_trace": self.keep_trace,
            "validation_names": self.validation_names,
            "has_per_validation": self._per_val is not None,
            "files": files,
            "trace": parts,
        }
        if self.group_lrs:
            meta["group_lrs"] = {str(k): v for k, v in sorted(self.group_lrs.items())}
        if fsync and (directory / TRACE_DIR).is_dir():
            fsync_dir(directory / TRACE_DIR)
        write_json(directory / LEDGER_META_FILE, meta, fsync=fsync)  # (and the directory)
        listed = {Path(p["file"]).name for p in parts}
        trace_dir = directory / TRACE_DIR
        if trace_dir.is_dir() and (self.trace_dir is None or trace_dir.resolve() != self.trace_dir.resolve()):
            for old in trace_dir.glob("part-*.parquet"):  # from an earlier save, now stale
                if old.name not in listed:
                    old.unlink(missing_ok=True)
        for stale in (TRACE_FILE,) if (directory / TRACE_FILE).exists() else ():
            (directory / stale).unlink(missing_ok=True)  # a format-1 trace left by an older save
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, trace_dir: str | os.PathLike | None = None) -> ValueLedger:
        """Read a ledger written by :meth:`save`, verifying every file against ``ledger.json``.

        Args:
            trace_dir: keep the trace parts there (linked from ``directory``), for a ledger that
                goes on adding steps (``inrun train --resume``).

        Raises:
            IntegrityError: a file is missing or its bytes are not the ones written.
            LedgerError: ``directory`` is not a saved ledger.
        """
        directory = Path(directory)
        meta_path = directory / LEDGER_META_FILE
        if not meta_path.exists():
            raise LedgerError(f"{directory} has no {LEDGER_META_FILE}: not a saved ledger")
        what = "the ledger's file list"
        meta = read_json(meta_path, what, require_checksum=False)
        if meta.get("format") == 1:
            return cls._load_v1(directory, meta)
        meta = read_json(meta_path, what)  # from format 2 on, a file without its checksum is damaged
        if meta.get("format") != LEDGER_FORMAT:
            raise LedgerError(f"{meta_path}: unknown ledger format {meta.get('format')!r}")
        files = meta.get("files") or {}
        if VALUES_FILE not in files or (meta.get("has_per_validation") and PER_VALIDATION_FILE not in files):
            raise IntegrityError(f"{meta_path} is damaged: its file list is incomplete")
        for name, digest in files.items():
            verify_file(directory / name, digest, f"listed in {meta_path}")
        state = _read_values(directory, meta, IntegrityError)
        state["group_lrs"] = meta.get("group_lrs")
        ledger = cls(keep_trace=bool(meta.get("keep_trace", False)), trace_dir=trace_dir)
        ledger._set_values(state)
        for entry in meta.get("trace") or []:
            ledger._parts.append(_adopt_part(directory, entry, ledger.trace_dir, meta_path))
        return ledger

    @classmethod
    def _load_v1(cls, directory: Path, meta: Mapping[str, Any]) -> ValueLedger:
        """A ledger saved by inrun before checksums (format 1): read as it is, unverified."""
        state = _read_values(directory, meta, LedgerError)
        state["trace"] = None
        state["keep_trace"] = meta.get("keep_trace", False)
        if state["keep_trace"] and (directory / TRACE_FILE).exists():
            tr = _read_table(directory / TRACE_FILE).to_pydict()
            state["trace"] = {k: np.asarray(v) if k != "id" else list(v) for k, v in tr.items()}
        return cls.from_state(state)


def _read_values(directory: Path, meta: Mapping[str, Any], error: type[Exception]) -> dict[str, Any]:
    """The values table (and per-validation table) of a saved ledger as a ``from_state`` dict."""
    t = _read_table(directory / VALUES_FILE).to_pydict()
    state: dict[str, Any] = {
        "ids": t["id"],
        "sources": t["source"],
        "first_order": np.asarray(t["first_order"], dtype=np.float64),
        "second_order": np.asarray(t["second_order"], dtype=np.float64),
        "count": np.asarray(t["count"], dtype=np.int64),
        "per_validation": None,
        "validation_names": meta.get("validation_names"),
        "skipped": meta.get("skipped", []),
        "steps": meta.get("steps", 0),
    }
    if meta.get("has_per_validation"):
        pv = _read_table(directory / PER_VALIDATION_FILE).to_pydict()
        if pv.pop("id") != t["id"]:
            raise error(f"{PER_VALIDATION_FILE} ids do not match {VALUES_FILE} in {directory}")
        state["per_validation"] = np.stack([np.asarray(v) for v in pv.values()], axis=1)
    return state


def _adopt_part(directory: Path, entry: Mapping[str, Any], store: Path | None, listed_in: Path) -> TracePart:
    """The part ``entry`` of the ledger in ``directory``, verified; with a ``store``, also there."""
    try:
        name = str(entry["file"])
        first, last, rows = int(entry["first_step"]), int(entry["last_step"]), int(entry["rows"])
        digest = {"sha256": str(entry["sha256"]), "size": int(entry["size"])}
    except (KeyError, TypeError, ValueError):
        raise IntegrityError(f"{listed_in} is damaged: a trace entry is malformed") from None
    if Path(name).parent != Path(TRACE_DIR) or not Path(name).name.startswith("part-"):
        raise IntegrityError(f"{listed_in} is damaged: trace part {name!r} is not under {TRACE_DIR}/")
    source = directory / name
    verify_file(source, digest, f"listed in {listed_in}")
    path = source
    if store is not None:
        target = store / Path(name).name
        same = target.exists() and os.path.samefile(target, source)
        if not same:
            try:
                verify_file(target, digest, "trace part")
            except IntegrityError:
                link_or_copy(source, target)  # missing or damaged in the store: heal it
        path = target
    return TracePart(name, path, digest["sha256"], digest["size"], rows, first, last)


def _read_table(path: Path) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise IntegrityError(f"{path} cannot be read as Parquet ({' '.join(str(exc).split())[:160]})") from None


def _read_part(part: TracePart) -> dict[str, Any]:
    t = _read_table(part.path)
    return {
        "step": t.column("step").to_numpy().astype(np.int64, copy=False),
        "lr": t.column("lr").to_numpy().astype(np.float64, copy=False),
        "id": t.column("id").to_pylist(),
        "first_order": t.column("first_order").to_numpy().astype(np.float64, copy=False),
        "second_order": t.column("second_order").to_numpy().astype(np.float64, copy=False),
    }


def _id_array(ids: list[Id]) -> Any:
    import pyarrow as pa

    if all(isinstance(i, int) for i in ids):
        return pa.array(ids, type=pa.int64())
    if all(isinstance(i, str) for i in ids):
        return pa.array(ids, type=pa.string())
    raise LedgerError("ids mix int and str; use one type so they can be stored in one column")


def merge_states(states: Sequence[dict[str, Any]]) -> ValueLedger:
    """One ledger from several :meth:`ValueLedger.state` dicts, summing values and counts by id.

    Sources: the first rank's non-empty label wins. Per-validation tables must have the same
    columns on every rank. Traces are concatenated and ordered by step (stable, rank order
    within a step); skipped steps are listed once.
    """
    if not states:
        raise LedgerError("no ledger states to merge")
    index: dict[Any, int] = {}
    ids: list[Any] = []
    for st in states:
        for i in st["ids"]:
            if i not in index:
                index[i] = len(ids)
                ids.append(i)
    n = len(ids)
    first = np.zeros(n, dtype=np.float64)
    second = np.zeros(n, dtype=np.float64)
    count = np.zeros(n, dtype=np.int64)
    sources: list[str | None] = [None] * n
    widths = {st["per_validation"].shape[1] for st in states if st["per_validation"] is not None}
    if len(widths) > 1:
        raise LedgerError(f"ranks disagree on the number of validation columns: {sorted(widths)}")
    per_val = np.zeros((n, widths.pop()), dtype=np.float64) if widths else None
    for st in states:
        rows = np.fromiter((index[i] for i in st["ids"]), dtype=np.int64, count=len(st["ids"]))
        np.add.at(first, rows, np.asarray(st["first_order"], dtype=np.float64))
        np.add.at(second, rows, np.asarray(st["second_order"], dtype=np.float64))
        np.add.at(count, rows, np.asarray(st["count"], dtype=np.int64))
        if per_val is not None and st["per_validation"] is not None:
            np.add.at(per_val, rows, np.asarray(st["per_validation"], dtype=np.float64))
        for r, s in zip(rows, st["sources"]):
            if sources[r] is None and s is not None:
                sources[r] = s
    keep_trace = any(st.get("keep_trace", False) for st in states)
    return ValueLedger.from_state(
        {
            "ids": ids,
            "sources": sources,
            "first_order": first,
            "second_order": second,
            "count": count,
            "per_validation": per_val,
            "validation_names": next(
                (st["validation_names"] for st in states if st.get("validation_names")), None
            ),
            "trace": _merge_traces([st.get("trace") for st in states]) if keep_trace else None,
            "skipped": _merge_skipped([st.get("skipped", []) for st in states]),
            "steps": max(int(st.get("steps", 0)) for st in states),
            "keep_trace": keep_trace,
            "group_lrs": {k: v for st in states for k, v in (st.get("group_lrs") or {}).items()},
        }
    )


def _merge_traces(traces: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    present = [t for t in traces if t is not None and len(t["step"])]
    if not present:
        return None
    cols = ("step", "lr", "first_order", "second_order")
    out: dict[str, Any] = {c: np.concatenate([np.asarray(t[c]) for t in present]) for c in cols}
    out["id"] = [i for t in present for i in t["id"]]
    order = np.argsort(out["step"], kind="stable")
    for c in cols:
        out[c] = out[c][order]
    out["id"] = [out["id"][k] for k in order]
    return out


def _merge_skipped(lists: Sequence[Sequence[dict[str, Any]]]) -> list[dict[str, Any]]:
    seen: set[tuple[int, str]] = set()
    out = []
    for entries in lists:
        for e in entries:
            key = (int(e["step"]), str(e["reason"]))
            if key not in seen:
                seen.add(key)
                out.append({"step": key[0], "reason": key[1]})
    return sorted(out, key=lambda e: e["step"])
