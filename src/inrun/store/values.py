"""The values of a run as a read-only table: what :meth:`ValueLedger.values` returns.

Rows are in id order (int ids ascending; str ids in the order of their 64-bit key, see
:mod:`inrun.store.table`), as the store keeps them. A lookup is a binary search over the keys:
nothing per id is a Python object until :meth:`ValueTable.ids` or :meth:`ValueTable.to_pandas`
asks for one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LedgerError
from ..files import atomic_write
from ..tracking.admission import Id
from .table import IdTable, hash_key


class ValueTable(Mapping):
    """Read-only mapping id -> accumulated value (float64), with a few conveniences.

    Example:
        >>> values = tracker.values()          # doctest: +SKIP
        >>> values[17], values.count(17)       # doctest: +SKIP
        >>> values.top(10), values.to_pandas() # doctest: +SKIP
    """

    def __init__(
        self,
        ids: Sequence[Id] | Any,
        value: np.ndarray,
        first_order: np.ndarray,
        second_order: np.ndarray,
        count: np.ndarray,
        sources: Sequence[str | None] | tuple[np.ndarray, list[str]] | None,
        keys: np.ndarray | None = None,
    ) -> None:
        """``ids``: a list, an int64 array or Arrow strings; ``sources``: one label per id, or
        ``(codes, names)`` (codes ``-1``: none); ``keys``: the ids' keys when they are known to be
        sorted (the store's order)."""
        self._ids = ids
        self.kind = "str" if _is_text(ids) else "int"
        if keys is None:
            keys, _ = IdTable().keys_of(list(ids) if not isinstance(ids, np.ndarray) else ids.tolist())
        self._keys = np.asarray(keys, dtype=np.int64)
        self._order = None if len(self._keys) < 2 or np.all(np.diff(self._keys) >= 0) else np.argsort(
            self._keys, kind="stable")
        self.value = value
        self.first_order = first_order
        self.second_order = second_order
        self.counts = count
        if isinstance(sources, tuple):
            self._source_codes, self._source_names = np.asarray(sources[0]), list(sources[1])
            self._sources: list[str | None] | None = None
        else:
            self._source_codes, self._source_names = None, []
            self._sources = list(sources) if sources is not None else [None] * len(self._keys)

    @property
    def sources(self) -> list[str | None]:
        """The data source of each row (``None``: none), made on first use (the table keeps codes)."""
        if self._sources is None:
            names = np.array([*self._source_names, None], dtype=object)
            codes = self._source_codes
            self._sources = names[np.where(codes < 0, len(self._source_names), codes)].tolist()
        return self._sources

    # -- lookups ----------------------------------------------------------------------------------
    def rows_of(self, ids: Sequence[Any]) -> np.ndarray:
        """The row of each id (``-1``: not in the table), vectorized."""
        n = len(ids)
        out = np.full(n, -1, dtype=np.int64)
        if not n or not len(self._keys):
            return out
        wanted = [int(i) if isinstance(i, np.integer) else i for i in ids]
        ok = np.fromiter((isinstance(i, str) == (self.kind == "str") and not isinstance(i, bool) for i in wanted),
                         dtype=bool, count=n)
        if self.kind == "str":
            keys = np.fromiter((hash_key(i) if k else 0 for i, k in zip(wanted, ok)), dtype=np.int64, count=n)
        else:
            keys = np.fromiter((i if k and -(2**63) <= i < 2**63 else 0 for i, k in zip(wanted, ok)),
                               dtype=np.int64, count=n)
        sk = self._keys if self._order is None else self._keys[self._order]
        at = np.searchsorted(sk, keys)
        hit = ok & (at < len(sk))
        hit[hit] = sk[at[hit]] == keys[hit]
        rows = at if self._order is None else self._order[np.minimum(at, len(sk) - 1)]
        out[hit] = rows[hit]
        if self.kind == "str":
            for k in np.nonzero(hit)[0]:
                if self._id_at(int(out[k])) != wanted[k]:  # a hash collision: look among equal keys
                    out[k] = -1
                    j = at[k]
                    while j < len(sk) and sk[j] == keys[k]:
                        r = j if self._order is None else self._order[j]
                        if self._id_at(int(r)) == wanted[k]:
                            out[k] = r
                            break
                        j += 1
        return out

    def _row(self, key: Any) -> int:
        row = int(self.rows_of([key])[0])
        if row < 0:
            raise KeyError(key)
        return row

    def _id_at(self, row: int) -> Id:
        i = self._ids[row]
        return i.as_py() if hasattr(i, "as_py") else (int(i) if isinstance(i, np.integer) else i)

    def __getitem__(self, key: Id) -> float:
        return float(self.value[self._row(key)])

    def __contains__(self, key: object) -> bool:
        return bool(self.rows_of([key])[0] >= 0)

    def __iter__(self) -> Iterator[Id]:
        return iter(self.ids())

    def __len__(self) -> int:
        return len(self._keys)

    def __repr__(self) -> str:
        return f"ValueTable({len(self)} examples, total={self.value.sum():.6g})"

    def count(self, key: Id) -> int:
        """How many times the example was in a valued step."""
        return int(self.counts[self._row(key)])

    def ids(self) -> list[Id]:
        """The ids, in the table's order (a Python list: one object per id)."""
        if isinstance(self._ids, np.ndarray):
            return self._ids.tolist()
        if hasattr(self._ids, "to_pylist"):
            return self._ids.to_pylist()
        return list(self._ids)

    def top(self, k: int = 10) -> list[tuple[Id, float]]:
        """The ``k`` most helpful examples, highest value first."""
        order = np.argsort(-self.value, kind="stable")[:k]
        return [(self._id_at(int(r)), float(self.value[r])) for r in order]

    def bottom(self, k: int = 10) -> list[tuple[Id, float]]:
        """The ``k`` most harmful examples, lowest value first."""
        order = np.argsort(self.value, kind="stable")[:k]
        return [(self._id_at(int(r)), float(self.value[r])) for r in order]

    # -- exports ------------------------------------------------------------------------------------
    def to_pandas(self) -> Any:
        """``pandas.DataFrame``: id, value, first_order, second_order, count, source."""
        import pandas as pd

        return pd.DataFrame({"id": self.ids(), "value": self.value, "first_order": self.first_order,
                             "second_order": self.second_order, "count": self.counts, "source": self.sources})

    def to_arrow(self) -> Any:
        """``pyarrow.Table`` with the columns of :meth:`to_pandas` (ids keep their type)."""
        import pyarrow as pa

        ids = self._ids if hasattr(self._ids, "to_pylist") else id_array(self.ids())
        return pa.table({
            "id": ids, "value": self.value, "first_order": self.first_order,
            "second_order": self.second_order, "count": self.counts,
            "source": pa.array(list(self.sources), type=pa.string()),
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
        rows = self.rows_of(dataset[id_column])
        found = rows >= 0
        out = dataset.add_column(column, np.where(found, self.value[np.maximum(rows, 0)], np.nan).tolist())
        if count_column is not None:
            out = out.add_column(count_column, np.where(found, self.counts[np.maximum(rows, 0)], 0).tolist())
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


def _is_text(ids: Any) -> bool:
    if hasattr(ids, "type"):
        import pyarrow as pa

        return pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type)
    if isinstance(ids, np.ndarray):
        return ids.dtype.kind in "OUS" and len(ids) > 0 and isinstance(ids[0], str)
    return len(ids) > 0 and isinstance(ids[0], str)


def id_array(ids: Sequence[Id]) -> Any:
    """Ids as one Arrow column (int64 or string); refuses a mix."""
    import pyarrow as pa

    if all(isinstance(i, int) for i in ids):
        return pa.array(ids, type=pa.int64())
    if all(isinstance(i, str) for i in ids):
        return pa.array(ids, type=pa.string())
    raise LedgerError("ids mix int and str; use one type so they can be stored in one column")
