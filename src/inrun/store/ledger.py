"""Values by example id, accumulated over the steps of a run; saved to and loaded from Parquet.

Every appearance of an example adds its step value (the paper's plain sum over iterations, no
normalization) and increments its count. Values are float64 on the host. The first-order part
and the second-order correction are kept apart so both can be reported. Optionally a per-step
trace (step, lr, id, both parts) and a per-(train, validation) table are kept.

The values live in an :class:`~inrun.store.table.IdTable`: numeric arrays keyed by id, a small
constant per id (28 bytes per int id), no Python object per id, appends that never copy it.

A saved ledger is a directory (:meth:`ValueLedger.save`)::

    values.parquet           id, value, first_order, second_order, count, source
    per_validation.parquet   id and one column per validation example (vector val_loss only)
    trace/part-A-B.parquet   trace rows of steps A..B: step, lr, id, first_order, second_order
    ledger.json              steps, skipped steps, and the SHA-256 and size of every file above

Beyond a million ids the values are Parquet partitions by id range instead,
``values/part-00000.parquet`` ... (:mod:`inrun.store.partitions`), written one at a time, and
one id or an id range can be read without loading the rest (:meth:`ValueLedger.read`,
:meth:`ValueLedger.read_range`).

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
from collections.abc import Mapping, Sequence
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
from . import partitions
from .table import IdTable
from .values import PerValidation, ValueTable, id_array

VALUES_FILE = "values.parquet"
PER_VALIDATION_FILE = "per_validation.parquet"
TRACE_FILE = "trace.parquet"  # format 1 (one file, rewritten at every save)
TRACE_DIR = "trace"
LEDGER_FORMAT = 2
PARTITIONED_FORMAT = 3  # values cut into partitions by id range
LEDGER_META_FILE = "ledger.json"


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
        self._table = IdTable()
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
        K = first.shape[1]
        if K > 1 and self._table.columns and self._table.columns != K:
            raise LedgerError(
                f"step {step} has {K} validation columns, earlier steps had {self._table.columns}"
            )
        ids = list(ids)
        self._table.add(ids, first.sum(axis=1), second.sum(axis=1), per_val=first + second if K > 1 else None)
        if self.keep_trace:
            self._trace.append(
                {
                    "step": np.full(len(ids), step, dtype=np.int64),
                    "lr": np.full(len(ids), np.nan if lr is None else lr, dtype=np.float64),
                    "id": _id_column(ids),
                    "first_order": first.sum(axis=1),
                    "second_order": second.sum(axis=1),
                }
            )
            self._trace_rows += len(ids)
            if self._undo is None and self.trace_dir is not None and self._trace_rows >= self.spill_rows:
                self._seal(self.trace_dir)
        self.steps = max(self.steps, step + 1)

    def id_kind(self) -> type | None:
        """``int`` or ``str``: the kind of this ledger's ids (``None`` while it has none)."""
        return {"int": int, "str": str}.get(self._table.kind or "") if len(self._table) else None

    def record_skip(self, step: int, reason: str) -> None:
        """Note a step whose values were not added (NaN loss, skipped optimizer step...)."""
        self.skipped.append({"step": int(step), "reason": reason})
        self.steps = max(self.steps, step + 1)

    def set_sources(self, sources: Mapping[Id, str]) -> None:
        """Attach a data-source label (e.g. a package or domain) to ids, seen or not yet seen."""
        self._table.set_sources(list(sources), list(sources.values()))

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
        self._table.mark()
        self._undo = {
            "trace": len(self._trace), "trace_rows": self._trace_rows,
            "parts": len(self._parts), "skipped": len(self.skipped), "steps": self.steps,
        }

    def commit(self) -> None:
        """Forget the mark: what was added since is kept for good."""
        self._undo = None
        self._table.commit()

    @property
    def marked(self) -> bool:
        return self._undo is not None

    def rollback(self) -> None:
        """Return to the state of the last :meth:`mark` (exactly: the old numbers are put back)."""
        undo, self._undo = self._undo, None
        if undo is None:
            raise LedgerError("rollback() without a mark(): nothing to return to")
        self._table.rollback()
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
        return len(self._table)

    @property
    def table(self) -> IdTable:
        """The values by id (:class:`~inrun.store.table.IdTable`): what exports and batched
        lookups read (``table.lookup(ids)``), without a snapshot of the whole table."""
        return self._table

    def nbytes(self) -> int:
        """Bytes of the value table's arrays (what the ledger holds per id, times the ids)."""
        return self._table.nbytes()

    def _columns(self) -> dict[str, Any] | None:
        """The whole table in id order, one set of arrays (``None``: empty)."""
        return next(iter(self._table.partitions(max(1, len(self._table)), by_id=True)), None)

    def values(self) -> ValueTable:
        """A snapshot: id -> accumulated value (first order + second-order correction), in id
        order (int ids ascending, str ids as text). Its arrays are the whole table's: for tables larger than memory, read saved
        ledgers by id or range (:meth:`read`, :meth:`read_range`)."""
        cols = self._columns()
        if cols is None:
            empty = np.zeros(0)
            return ValueTable([], empty, empty, empty.copy(), np.zeros(0, dtype=np.int64), [])
        sources = None if cols["source"] is None else (cols["source"], cols["source_names"])
        return ValueTable(cols["id"], cols["first"] + cols["second"], cols["first"], cols["second"], cols["count"],
                          sources, keys=cols["key"])

    def per_validation(self) -> PerValidation | None:
        """Per-(train, validation) values (:class:`PerValidation`, which unpacks as
        ``(ids, [N, V])``), if the validation loss was a vector; else ``None``."""
        cols = self._columns() if self._table.columns else None
        if cols is None:
            return None
        pv = cols["per_val"]
        names = self.validation_names or [f"val_{k}" for k in range(pv.shape[1])]
        return PerValidation(_as_list(cols["id"]), pv, names)

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
        out["id"] = [i for t in self._trace for i in t["id"].tolist()]
        return out

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the ledger, as plain lists and arrays (trace included)."""
        values = self.values()
        pv = self.per_validation()
        return {
            "ids": values.ids(),
            "sources": list(values.sources),
            "first_order": values.first_order,
            "second_order": values.second_order,
            "count": values.counts,
            "per_validation": None if pv is None else pv.values,
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
                    "id": _id_column(list(trace["id"])),
                    "first_order": np.asarray(trace["first_order"], dtype=np.float64),
                    "second_order": np.asarray(trace["second_order"], dtype=np.float64),
                }
            )
            ledger._trace_rows = len(trace["step"])
        return ledger

    def _set_values(self, state: Mapping[str, Any]) -> None:
        ids = list(state["ids"])
        self._table = IdTable()
        if ids:
            pv = state.get("per_validation")
            self._table.add(ids, np.asarray(state["first_order"], dtype=np.float64),
                            np.asarray(state["second_order"], dtype=np.float64),
                            per_val=None if pv is None else np.asarray(pv, dtype=np.float64),
                            count=np.asarray(state["count"]))
            labelled = [(i, s) for i, s in zip(ids, state["sources"]) if s is not None]
            if labelled:
                self._table.set_sources([i for i, _ in labelled], [s for _, s in labelled])
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
                "id": id_array(cols["id"]),
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
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        files, value_parts = partitions.write_values(self._table, directory, validation_names=self.validation_names,
                                                     fsync=fsync)
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
            "format": LEDGER_FORMAT if VALUES_FILE in files else PARTITIONED_FORMAT,
            "steps": self.steps,
            "skipped": self.skipped,
            "keep_trace": self.keep_trace,
            "validation_names": self.validation_names,
            "has_per_validation": bool(self._table.columns),
            "files": files,
            "trace": parts,
        }
        if VALUES_FILE not in files:  # a table of one file keeps the format it always had
            meta["partitions"] = value_parts
        if self.group_lrs:
            meta["group_lrs"] = {str(k): v for k, v in sorted(self.group_lrs.items())}
        for sub in (TRACE_DIR, partitions.VALUES_DIR, partitions.PER_VALIDATION_DIR):
            if fsync and (directory / sub).is_dir():
                fsync_dir(directory / sub)
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
        meta, value_parts = _read_meta(directory)
        files = meta["files"]
        ledger = cls(keep_trace=bool(meta.get("keep_trace", False)), trace_dir=trace_dir)
        ledger._table = partitions.read_values(directory, value_parts, files)
        ledger._set_meta(meta)
        for entry in meta.get("trace") or []:
            ledger._parts.append(_adopt_part(directory, entry, ledger.trace_dir, meta_path))
        return ledger

    def _set_meta(self, meta: Mapping[str, Any]) -> None:
        self.validation_names = meta.get("validation_names")
        self.skipped = list(meta.get("skipped", []))
        self.steps = int(meta.get("steps", 0))
        self.group_lrs = {int(k): [float(x) for x in v] for k, v in (meta.get("group_lrs") or {}).items()}

    @staticmethod
    def read(directory: str | os.PathLike, ids: Sequence[Id]) -> dict[Id, dict[str, Any]]:
        """The saved records of ``ids`` (id, value, first_order, second_order, count, source,
        per_validation), reading only the partitions that hold them, each verified."""
        directory = Path(directory)
        meta, value_parts = _read_meta(directory, verify=False)
        return partitions.read_ids(directory, value_parts, meta["files"], list(ids))

    @staticmethod
    def read_range(directory: str | os.PathLike, lo: int, hi: int) -> Any:
        """A ``pyarrow.Table`` of the saved int ids in ``[lo, hi]``, in id order, reading only
        the partitions whose range overlaps (``None``: no such id)."""
        directory = Path(directory)
        meta, value_parts = _read_meta(directory, verify=False)
        return partitions.read_range(directory, value_parts, meta["files"], lo, hi)

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


def _read_meta(directory: Path, verify: bool = True) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """``ledger.json`` of a saved ledger (format 2 or 3) and its value partitions; with
    ``verify``, every listed file checked (a read of some ids checks only what it reads)."""
    meta_path = directory / LEDGER_META_FILE
    if not meta_path.exists():
        raise LedgerError(f"{directory} has no {LEDGER_META_FILE}: not a saved ledger")
    meta = read_json(meta_path, "the ledger's file list")
    if meta.get("format") not in (LEDGER_FORMAT, PARTITIONED_FORMAT):
        raise LedgerError(f"{meta_path}: unknown ledger format {meta.get('format')!r}")
    files = meta.get("files") or {}
    if meta.get("format") == LEDGER_FORMAT and not meta.get("partitions"):  # saved before partitions
        entry: dict[str, Any] = {"file": VALUES_FILE, "lo": -(2**63), "hi": 2**63 - 1, "rows": 1}
        if meta.get("has_per_validation"):
            entry["per_validation"] = PER_VALIDATION_FILE
        value_parts = [entry]
    else:
        value_parts = list(meta.get("partitions") or [])
    needed = partitions.listed_files(value_parts)
    if not value_parts or any(n not in files for n in needed):
        raise IntegrityError(f"{meta_path} is damaged: its file list is incomplete")
    if verify:
        for name, digest in files.items():
            verify_file(directory / name, digest, f"listed in {meta_path}")
    return meta, value_parts


def _id_column(ids: list[Id]) -> np.ndarray:
    """A step's ids as one array (int64, or objects for str ids) for the trace."""
    if ids and isinstance(ids[0], str):
        out = np.empty(len(ids), dtype=object)
        out[:] = ids
        return out
    return np.asarray(ids, dtype=np.int64)


def _as_list(ids: Any) -> list[Id]:
    return ids.tolist() if isinstance(ids, np.ndarray) else ids.to_pylist()


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


RANKS_DIR = "ranks"


def save_across_ranks(ledger: ValueLedger, directory: str | os.PathLike, group: Any = None,
                      fsync: bool = True) -> Path:
    """The ledgers of every rank of a DDP or FSDP job saved as one, without gathering the table
    on any rank (a collective: call it on every rank, with that rank's own ``tracker.ledger``).

    Each rank saves its ledger under ``directory/ranks/rank-NNNNN/``; then the output id ranges
    are shared out (rank ``r`` writes ranges ``r, r + W, ...``), each range reading only the
    overlapping rows of every rank's partitions and summing them by id (:func:`partitions.merge_saved`);
    rank 0 writes ``ledger.json`` last, listing every partition and every rank's trace parts.
    Memory per rank: its own ledger and one output range. The directory needs to be visible to
    every rank (a shared filesystem). ``ValueLedger.load(directory)`` reads the merged ledger.
    """
    import torch.distributed as dist

    rank, world = dist.get_rank(group), dist.get_world_size(group)
    directory = Path(directory)
    ledger.save(directory / RANKS_DIR / f"rank-{rank:05d}", fsync=fsync)
    dist.barrier(group)
    sources = []
    metas = []
    for r in range(world):
        src = directory / RANKS_DIR / f"rank-{r:05d}"
        meta, value_parts = _read_meta(src, verify=False)
        sources.append((src, value_parts, meta["files"]))
        metas.append(meta)
    files, value_parts = partitions.merge_saved(sources, directory, part=(rank, world), fsync=fsync,
                                                validation_names=ledger.validation_names)
    written: list[Any] = [None] * world
    dist.all_gather_object(written, (files, value_parts), group=group)
    if rank == 0:
        _write_merged_meta(directory, metas, written, fsync)
    dist.barrier(group)
    return directory


def _write_merged_meta(directory: Path, metas: Sequence[Mapping[str, Any]], written: Sequence[Any],
                       fsync: bool) -> None:
    """``ledger.json`` of ranks' ledgers merged into ``directory``: every output partition, and
    each rank's trace parts linked in under a rank-suffixed name."""
    files: dict[str, Any] = {}
    value_parts: list[dict[str, Any]] = []
    for f, p in written:
        files.update(f)
        value_parts += p
    value_parts.sort(key=lambda e: int(e["lo"]))
    trace: list[dict[str, Any]] = []
    for r, meta in enumerate(metas):
        for entry in meta.get("trace") or []:
            name = Path(entry["file"])
            renamed = f"{TRACE_DIR}/{name.stem}-r{r:05d}{name.suffix}"
            link_or_copy(directory / RANKS_DIR / f"rank-{r:05d}" / entry["file"], directory / renamed)
            trace.append({**entry, "file": renamed})
    trace.sort(key=lambda e: (int(e["first_step"]), e["file"]))
    meta = {
        "format": PARTITIONED_FORMAT,
        "steps": max(int(m.get("steps", 0)) for m in metas),
        "skipped": _merge_skipped([m.get("skipped", []) for m in metas]),
        "keep_trace": any(m.get("keep_trace", False) for m in metas),
        "validation_names": next((m["validation_names"] for m in metas if m.get("validation_names")), None),
        "has_per_validation": any(m.get("has_per_validation") for m in metas),
        "files": files,
        "trace": trace,
        "partitions": value_parts,
    }
    lrs = {k: v for m in metas for k, v in (m.get("group_lrs") or {}).items()}
    if lrs:
        meta["group_lrs"] = lrs
    for sub in (TRACE_DIR, partitions.VALUES_DIR, partitions.PER_VALIDATION_DIR):
        if fsync and (directory / sub).is_dir():
            fsync_dir(directory / sub)
    write_json(directory / LEDGER_META_FILE, meta, fsync=fsync)
