"""Values by example id, accumulated over the steps of a run; saved to and loaded from Parquet.

Every appearance of an example adds its step value (the paper's plain sum over iterations, no
normalization) and increments its count. Values are float64 on the host. The first-order part
and the second-order correction are kept apart so both can be reported. Optionally a per-step
trace (step, lr, id, both parts) and a per-(train, validation) table are kept.

Files are written atomically (to a temporary name in the same directory, then renamed) and
contain only ids and numbers: no pickles.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .errors import LedgerError

Id = int | str

VALUES_FILE = "values.parquet"
PER_VALIDATION_FILE = "per_validation.parquet"
TRACE_FILE = "trace.parquet"
LEDGER_META_FILE = "ledger.json"


def check_ids(ids: Any) -> list[Id]:
    """Normalize ids (list, tuple, 1-D int tensor or array) to a list of ``int``/``str``."""
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        if getattr(ids, "ndim", 1) != 1:
            raise TypeError(f"ids must be one-dimensional, got shape {tuple(ids.shape)}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Iterable):
        raise TypeError(
            f"ids must be a sequence with one id per example, got {type(ids).__name__}"
        )
    out: list[Id] = []
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, str, np.integer)):
            hint = "" if isinstance(i, Hashable) else " (it is not even hashable)"
            raise TypeError(
                f"example ids must be int or str, got {type(i).__name__} {i!r}{hint}. "
                "Use a stable index or key of the example in your dataset."
            )
        out.append(int(i) if isinstance(i, np.integer) else i)
    return out


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then atomically rename the result to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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


class ValueLedger:
    """Accumulates step values by example id.

    Args:
        keep_trace: also keep one row per (step, example) with the step's learning rate.
    """

    def __init__(self, keep_trace: bool = False) -> None:
        self.keep_trace = keep_trace
        self._index: dict[Id, int] = {}
        self._ids: list[Id] = []
        self._sources: list[str | None] = []
        self._first = np.zeros(0, dtype=np.float64)
        self._second = np.zeros(0, dtype=np.float64)
        self._count = np.zeros(0, dtype=np.int64)
        self._per_val: np.ndarray | None = None
        self.validation_names: list[str] | None = None
        self._trace: list[dict[str, np.ndarray]] = []
        self.skipped: list[dict[str, Any]] = []
        self.steps = 0

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
        lr: float | None = None,
    ) -> None:
        """Add one step's values.

        Args:
            step: the optimizer step (0-based) the values belong to.
            ids: one id per row.
            first_order: ``[B, K]`` first-order values per validation column (``K = 1``: summed).
            second_order: ``[B, K]`` second-order corrections, or ``None``.
            lr: the step's (first group's) learning rate, for the trace.
        """
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
        if K > 1:
            if self._per_val is None:
                self._per_val = np.zeros((self._first.shape[0], K), dtype=np.float64)
            elif self._per_val.shape[1] != K:
                raise LedgerError(
                    f"step {step} has {K} validation columns, earlier steps had {self._per_val.shape[1]}"
                )
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

    # -- reading ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._ids)

    def values(self) -> ValueTable:
        """A snapshot: id -> accumulated value (first order + second-order correction)."""
        n = len(self._ids)
        first, second = self._first[:n].copy(), self._second[:n].copy()
        return ValueTable(self._ids, first + second, first, second, self._count[:n].copy(), self._sources)

    def per_validation(self) -> tuple[list[Id], np.ndarray] | None:
        """``(ids, [N, V])`` per-(train, validation) values, if the validation loss was a vector."""
        if self._per_val is None:
            return None
        return list(self._ids), self._per_val[: len(self._ids)].copy()

    def trace(self) -> dict[str, np.ndarray] | None:
        """Column arrays of the per-step trace (``keep_trace=True``), ids resolved."""
        if not self.keep_trace:
            return None
        cols = ("step", "lr", "row", "first_order", "second_order")
        if self._trace:
            out = {c: np.concatenate([t[c] for t in self._trace]) for c in cols}
        else:
            out = {c: np.zeros(0) for c in cols}
        rows = out.pop("row").astype(np.int64)
        out["id"] = np.array([self._ids[r] for r in rows], dtype=object)
        return out

    # -- persistence ----------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        """Everything needed to rebuild the ledger, as plain lists and arrays."""
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
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> ValueLedger:
        ledger = cls(keep_trace=bool(state.get("keep_trace", False)))
        ids = list(state["ids"])
        rows = ledger._rows(ids)
        ledger._first[rows] = state["first_order"]
        ledger._second[rows] = state["second_order"]
        ledger._count[rows] = state["count"]
        ledger._sources = list(state["sources"])
        if state.get("per_validation") is not None:
            pv = np.asarray(state["per_validation"], dtype=np.float64)
            ledger._per_val = np.zeros((ledger._first.shape[0], pv.shape[1]))
            ledger._per_val[rows] = pv
        ledger.validation_names = state.get("validation_names")
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
        ledger.skipped = list(state.get("skipped", []))
        ledger.steps = int(state.get("steps", 0))
        return ledger

    def save(self, directory: str | os.PathLike) -> Path:
        """Write ``values.parquet`` (+ per-validation table, trace) and ``ledger.json``."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        st = self.state()
        id_col = _id_array(st["ids"])
        table = pa.table(
            {
                "id": id_col,
                "value": st["first_order"] + st["second_order"],
                "first_order": st["first_order"],
                "second_order": st["second_order"],
                "count": st["count"],
                "source": pa.array(st["sources"], type=pa.string()),
            }
        )
        atomic_write(directory / VALUES_FILE, lambda p: pq.write_table(table, p))
        if st["per_validation"] is not None:
            pv = st["per_validation"]
            names = st["validation_names"] or [f"val_{k}" for k in range(pv.shape[1])]
            cols = {"id": id_col, **{str(n): pv[:, k] for k, n in enumerate(names)}}
            atomic_write(directory / PER_VALIDATION_FILE, lambda p: pq.write_table(pa.table(cols), p))
        if st["trace"] is not None:
            tr = st["trace"]
            ttable = pa.table(
                {
                    "step": tr["step"],
                    "lr": tr["lr"],
                    "id": _id_array(list(tr["id"])),
                    "first_order": tr["first_order"],
                    "second_order": tr["second_order"],
                }
            )
            atomic_write(directory / TRACE_FILE, lambda p: pq.write_table(ttable, p))
        meta = {
            "format": 1,
            "steps": st["steps"],
            "skipped": st["skipped"],
            "keep_trace": st["keep_trace"],
            "validation_names": st["validation_names"],
            "has_per_validation": st["per_validation"] is not None,
        }
        atomic_write(
            directory / LEDGER_META_FILE,
            lambda p: Path(p).write_text(json.dumps(meta, indent=2)),
        )
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> ValueLedger:
        """Read a ledger written by :meth:`save`."""
        import pyarrow.parquet as pq

        directory = Path(directory)
        meta_path = directory / LEDGER_META_FILE
        if not meta_path.exists():
            raise LedgerError(f"{directory} has no {LEDGER_META_FILE}: not a saved ledger")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != 1:
            raise LedgerError(f"{meta_path}: unknown ledger format {meta.get('format')!r}")
        t = pq.read_table(directory / VALUES_FILE).to_pydict()
        state: dict[str, Any] = {
            "ids": t["id"],
            "sources": t["source"],
            "first_order": np.asarray(t["first_order"], dtype=np.float64),
            "second_order": np.asarray(t["second_order"], dtype=np.float64),
            "count": np.asarray(t["count"], dtype=np.int64),
            "per_validation": None,
            "validation_names": meta.get("validation_names"),
            "trace": None,
            "skipped": meta.get("skipped", []),
            "steps": meta.get("steps", 0),
            "keep_trace": meta.get("keep_trace", False),
        }
        if meta.get("has_per_validation"):
            pv = pq.read_table(directory / PER_VALIDATION_FILE).to_pydict()
            if pv.pop("id") != t["id"]:
                raise LedgerError(f"{PER_VALIDATION_FILE} ids do not match {VALUES_FILE}")
            state["per_validation"] = np.stack([np.asarray(v) for v in pv.values()], axis=1)
        if state["keep_trace"] and (directory / TRACE_FILE).exists():
            tr = pq.read_table(directory / TRACE_FILE).to_pydict()
            state["trace"] = {k: np.asarray(v) if k != "id" else list(v) for k, v in tr.items()}
        return cls.from_state(state)


def _id_array(ids: list[Id]) -> Any:
    import pyarrow as pa

    if all(isinstance(i, int) for i in ids):
        return pa.array(ids, type=pa.int64())
    if all(isinstance(i, str) for i in ids):
        return pa.array(ids, type=pa.string())
    raise LedgerError("ids mix int and str; use one type so they can be stored in one column")
