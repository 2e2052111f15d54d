"""Accumulated values keyed by example id, sized for a billion ids: no Python object per id.

Each id has a 64-bit *key*: the id itself for int ids, a BLAKE2b hash of the UTF-8 text for str
ids (the text is kept once, in an Arrow string array; ids whose hashes collide stay apart: a
lookup compares the text). Per id the table holds the key, the first-order and second-order sums
(float64), a count (int32), a source code (int32, once sources are set) and, with a vector
validation loss, one float64 per validation column: **28 bytes per int id** (32 with sources);
str ids add their UTF-8 bytes and a 4-byte offset.

Layout (a log-structured merge of sorted runs):

* the *delta* takes new ids in arrival order, with a sorted index of its keys; at
  :data:`DELTA_ROWS` it is sorted into a frozen *run*;
* runs of one tier are merged :data:`FANOUT` at a time into the next tier, up to
  :data:`MAX_RUN_ROWS`: a merge copies at most one such run, never the table, and each row is
  copied once per tier (a few times in all);
* an id seen again is added to in place; a lookup searches the runs whose key range holds its key
  (ids that arrive in increasing order, as a pass over a corpus gives them, touch one run).

:meth:`IdTable.partitions` walks the table in key order, one key range of about
``rows`` ids at a time (what a streaming save writes as one Parquet partition).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import itertools
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import LedgerError

DELTA_ROWS = 1 << 16
FANOUT = 4
MAX_RUN_ROWS = 1 << 24

Id = int | str
INT64 = np.iinfo(np.int64)


def hash_key(text: str) -> int:
    """The 64-bit key of a str id."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little", signed=True)


def release_memory() -> None:
    """Hand freed memory back to the system after a merge: glibc keeps freed blocks of the
    merged runs in its heap (its mmap threshold grows as large arrays are freed), and Arrow's
    pool keeps freed buffers, so without this the resident size creeps far above the table."""
    pa = sys.modules.get("pyarrow")
    if pa is not None:
        pa.default_memory_pool().release_unused()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _libc() -> Any:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") else None
    except OSError:  # pragma: no cover - not glibc
        return None


_LIBC = _libc()


@dataclass
class Run:
    """Rows sorted by key (frozen), or the delta (arrival order, ``order`` its sort by key)."""

    keys: np.ndarray
    first: np.ndarray
    second: np.ndarray
    count: np.ndarray
    source: np.ndarray | None = None
    per_val: np.ndarray | None = None
    text: Any = None
    """str ids: a ``pyarrow.StringArray`` (frozen runs) or a list of str (the delta)."""
    tier: int = 0
    n: int = -1
    order: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.n < 0:
            self.n = len(self.keys)

    @property
    def lo(self) -> int:
        return int(self.keys[0]) if self.n else 0

    @property
    def hi(self) -> int:
        return int(self.keys[self.n - 1]) if self.n else -1

    def sorted_keys(self) -> np.ndarray:
        return self.keys[: self.n] if self.order is None else self.keys[self.order]

    def text_at(self, rows: np.ndarray) -> list[str]:
        if isinstance(self.text, list):
            return [self.text[r] for r in rows]
        return self.text.take(rows).to_pylist()

    def nbytes(self) -> int:
        total = sum(a.nbytes for a in (self.keys, self.first, self.second, self.count, self.source, self.per_val)
                    if a is not None)
        if self.text is not None and not isinstance(self.text, list):
            total += self.text.nbytes
        return total


def _empty(capacity: int, columns: int, sources: bool) -> Run:
    return Run(
        keys=np.zeros(capacity, dtype=np.int64), first=np.zeros(capacity), second=np.zeros(capacity),
        count=np.zeros(capacity, dtype=np.int32),
        source=np.full(capacity, -1, dtype=np.int32) if sources else None,
        per_val=np.zeros((capacity, columns)) if columns else None, n=0, order=np.zeros(0, dtype=np.int64),
    )


@dataclass
class Located:
    """Where each id of a batch lives: ``run[k]`` (index into the table's runs, ``-1`` the delta)
    and ``row[k]`` in it."""

    run: np.ndarray
    row: np.ndarray


@dataclass
class _Undo:
    delta_rows: int
    delta_text: int
    changed: list[tuple[int, np.ndarray, dict[str, np.ndarray]]] = field(default_factory=list)
    """(run index, -1 the delta; rows; their old columns)"""
    had_per_val: bool = False
    had_sources: bool = False


class IdTable:
    """Sums by id (see the module docstring). ``kind`` is ``"int"`` or ``"str"`` once an id is in."""

    COLUMNS = ("first", "second", "count", "source", "per_val")

    def __init__(self) -> None:
        self.kind: str | None = None
        self.runs: list[Run] = []
        self.delta = _empty(0, 0, False)
        self.delta.text = []
        self.columns = 0  # per-validation columns (0: none kept)
        self.sources: list[str] = []
        self._source_code: dict[str, int] = {}
        self._undo: _Undo | None = None

    # -- keys ---------------------------------------------------------------------------------
    def keys_of(self, ids: Sequence[Id]) -> tuple[np.ndarray, list[str] | None]:
        """int64 keys of ``ids`` (and their texts for str ids); the table's id kind is set by the
        first id and kept."""
        if not len(ids):
            return np.zeros(0, dtype=np.int64), None
        kind = "str" if isinstance(ids[0], str) else "int"
        if self.kind is None:
            self.kind = kind
        mixed = LedgerError("ids mix int and str; use one type so they can be stored in one column")
        if kind != self.kind:
            raise mixed
        if kind == "str":
            texts = list(ids)
            if not all(isinstance(i, str) for i in texts):
                raise mixed
            return np.fromiter((hash_key(s) for s in texts), dtype=np.int64, count=len(texts)), texts
        try:
            keys = np.asarray(ids)
        except OverflowError:
            keys = np.asarray(ids, dtype=object)
        if keys.dtype.kind not in "iu":
            if keys.dtype == object and all(isinstance(i, int) for i in ids):
                raise LedgerError(f"int ids must fit in 64 bits (signed); got one in {min(ids)}..{max(ids)}")
            raise mixed
        if keys.dtype == np.uint64 and keys.max() > INT64.max:
            raise LedgerError(f"int ids must fit in 64 bits (signed); got {keys.max()}")
        return keys.astype(np.int64, copy=False), None

    # -- size -----------------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.delta.n + sum(r.n for r in self.runs)

    def nbytes(self) -> int:
        """Bytes held by the table's arrays (the delta's capacity and its texts included)."""
        total = self.delta.nbytes() + sum(r.nbytes() for r in self.runs)
        if isinstance(self.delta.text, list):
            total += sum(len(s) + 49 for s in self.delta.text)  # Python str objects of the delta
        return total

    # -- lookup ---------------------------------------------------------------------------------
    def locate(self, keys: np.ndarray, texts: list[str] | None) -> Located:
        """Where each key is (``run = -2``: not in the table)."""
        run = np.full(len(keys), -2, dtype=np.int64)
        row = np.zeros(len(keys), dtype=np.int64)
        by_key = np.argsort(keys, kind="stable")  # sorted needles: searchsorted walks each run once
        sorted_keys = keys[by_key]
        for r, part in [(-1, self.delta), *enumerate(self.runs)]:
            if not part.n:
                continue
            sk = part.sorted_keys()
            a, b = np.searchsorted(sorted_keys, sk[0]), np.searchsorted(sorted_keys, sk[-1], side="right")
            todo = by_key[a:b]
            todo = todo[run[todo] == -2]
            if not len(todo):
                continue
            at = np.searchsorted(sk, keys[todo])
            hit = at < part.n
            hit[hit] = sk[at[hit]] == keys[todo][hit]
            todo, at = todo[hit], at[hit]
            rows = at if part.order is None else part.order[at]
            if texts is not None and len(todo):
                rows, ok = self._match_texts(part, sk, at, rows, [texts[k] for k in todo])
                todo, rows = todo[ok], rows[ok]
            run[todo], row[todo] = r, rows
        return Located(run, row)

    @staticmethod
    def _match_texts(part: Run, sk: np.ndarray, at: np.ndarray, rows: np.ndarray,
                     wanted: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Rows whose text is the wanted id, among equal keys (hash collisions: rare)."""
        rows = rows.copy()
        ok = np.ones(len(rows), dtype=bool)
        found = part.text_at(rows)
        for k in [k for k, (a, b) in enumerate(zip(found, wanted)) if a != b]:
            ok[k] = False
            j = at[k] + 1
            while j < part.n and sk[j] == sk[at[k]]:
                r = j if part.order is None else part.order[j]
                if part.text_at(np.array([r]))[0] == wanted[k]:
                    rows[k], ok[k] = r, True
                    break
                j += 1
        return rows, ok

    def ensure(self, ids: Sequence[Id]) -> tuple[Located, bool]:
        """Every id located, new ones appended to the delta; and whether an id repeats."""
        keys, texts = self.keys_of(ids)
        repeats = self._repeats(keys, texts)
        loc = self.locate(keys, texts)
        new = np.nonzero(loc.run == -2)[0]
        if len(new):
            loc.run[new] = -1
            if not repeats:
                loc.row[new] = self._append(keys[new], None if texts is None else [texts[k] for k in new])
            else:  # an id twice in one addition: appended once, both positions pointing at it
                first: dict[Any, int] = {}
                inverse = np.array([first.setdefault(texts[k] if texts is not None else int(keys[k]), len(first))
                                    for k in new], dtype=np.int64)
                unique = new[np.unique(inverse, return_index=True)[1]]
                rows = self._append(keys[unique], None if texts is None else [texts[k] for k in unique])
                loc.row[new] = rows[inverse]
        return loc, repeats

    @staticmethod
    def _repeats(keys: np.ndarray, texts: list[str] | None) -> bool:
        """Whether an id appears twice among ``keys`` (equal str keys: their texts decide)."""
        ordered = np.sort(keys)
        if not np.any(ordered[1:] == ordered[:-1]):
            return False
        return texts is None or len(set(texts)) < len(texts)

    def _append(self, keys: np.ndarray, texts: list[str] | None) -> np.ndarray:
        d = self.delta
        if d.n + len(keys) > len(d.keys):
            self._grow_delta(d.n + len(keys))
            d = self.delta
        rows = np.arange(d.n, d.n + len(keys))
        d.keys[rows] = keys
        d.n += len(keys)
        if texts is not None:
            d.text.extend(texts)
        # the new keys sorted, then inserted into the sorted index (a copy of the index, no sort)
        new_order = np.argsort(keys, kind="stable")
        at = np.searchsorted(d.keys[d.order], keys[new_order], side="right")
        d.order = np.insert(d.order, at, rows[new_order])
        return rows

    def _grow_delta(self, n: int) -> None:
        d = self.delta
        capacity = max(n, 2 * len(d.keys), 1024)
        grown = _empty(capacity, self.columns, d.source is not None)
        for name in ("keys", *self.COLUMNS):
            a = getattr(d, name)
            if a is not None:
                getattr(grown, name)[: d.n] = a[: d.n]
        grown.n, grown.order, grown.text = d.n, d.order, d.text
        self.delta = grown

    # -- adding -----------------------------------------------------------------------------------
    def add(self, ids: Sequence[Id], first: np.ndarray, second: np.ndarray, per_val: np.ndarray | None = None,
            count: int | np.ndarray = 1) -> None:
        """Add ``first[k]``, ``second[k]`` (and ``per_val[k]``) to id ``ids[k]`` and count it once
        (or ``count[k]`` times: merging saved tables)."""
        loc, repeats = self.ensure(ids)
        if per_val is not None and not self.columns:
            self._enable_per_val(per_val.shape[1])
        counts = np.int32(count) if np.isscalar(count) else np.asarray(count).astype(np.int32)
        for r in np.unique(loc.run):
            part = self.delta if r == -1 else self.runs[r]
            pick = np.nonzero(loc.run == r)[0]
            rows = loc.row[pick]
            if self._undo is not None:
                self._undo.changed.append((int(r), rows, {n: getattr(part, n)[rows].copy() for n in self.COLUMNS
                                                          if getattr(part, n) is not None}))
            c = counts if counts.ndim == 0 else counts[pick]
            if not repeats:  # the usual case: one row per id, a plain indexed add
                part.first[rows] += first[pick]
                part.second[rows] += second[pick]
                part.count[rows] += c
                if per_val is not None:
                    part.per_val[rows] += per_val[pick]
            else:
                np.add.at(part.first, rows, first[pick])
                np.add.at(part.second, rows, second[pick])
                np.add.at(part.count, rows, c)
                if per_val is not None:
                    np.add.at(part.per_val, rows, per_val[pick])
        self._maybe_freeze()

    def set_sources(self, ids: Sequence[Id], names: Sequence[str | None], only_unset: bool = False) -> None:
        """Label ids (seen or not yet seen) with a data source (``only_unset``: keep labels there)."""
        loc, _ = self.ensure(ids)
        codes = np.array([-1 if s is None else self._source_code.setdefault(s, len(self._source_code)) for s in names],
                         dtype=np.int32)
        self.sources = list(self._source_code)
        for part in [self.delta, *self.runs]:
            if part.source is None:
                part.source = np.full(len(part.keys), -1, dtype=np.int32)
        for r in np.unique(loc.run):
            part = self.delta if r == -1 else self.runs[r]
            pick = np.nonzero(loc.run == r)[0]
            rows = loc.row[pick]
            if only_unset:
                free = part.source[rows] < 0
                pick, rows = pick[free], rows[free]
            if self._undo is not None:
                self._undo.changed.append((int(r), rows, {"source": part.source[rows].copy()}))
            part.source[rows] = codes[pick]
        self._maybe_freeze()

    def _enable_per_val(self, columns: int) -> None:
        self.columns = columns
        for part in [self.delta, *self.runs]:
            part.per_val = np.zeros((len(part.keys), columns))

    # -- freezing and merging ---------------------------------------------------------------------
    def _maybe_freeze(self) -> None:
        if self._undo is not None or self.delta.n < DELTA_ROWS:
            return
        d = self.delta
        order = d.order
        run = self._gather([d], [order])
        self.runs.append(run)
        fresh = _empty(DELTA_ROWS, self.columns, d.source is not None)
        fresh.text = []
        self.delta = fresh
        self._compact()

    def _gather(self, parts: list[Run], orders: list[np.ndarray], tier: int = 0) -> Run:
        """One frozen run of the given parts' rows (each in the given order), sorted by key."""
        keys = np.concatenate([p.keys[o] for p, o in zip(parts, orders)])
        merged = len(parts) > 1
        perm = np.argsort(keys, kind="stable") if merged else None

        def take(name: str) -> np.ndarray | None:
            if getattr(parts[0], name) is None:
                return None
            a = np.concatenate([getattr(p, name)[o] for p, o in zip(parts, orders)])
            return a[perm] if merged else a

        run = Run(keys=keys[perm] if merged else keys, first=take("first"), second=take("second"),
                  count=take("count"), source=take("source"), per_val=take("per_val"), tier=tier)
        if self.kind == "str":
            import pyarrow as pa

            texts = [p.text.take(pa.array(o)) if not isinstance(p.text, list) else pa.array([p.text[i] for i in o],
                     type=pa.string()) for p, o in zip(parts, orders)]
            text = pa.concat_arrays(texts) if len(texts) > 1 else texts[0]
            run.text = text.take(pa.array(perm)) if merged else text
        return run

    def _compact(self) -> None:
        while True:
            by_tier: dict[int, list[int]] = {}
            for i, r in enumerate(self.runs):
                if r.n * FANOUT <= MAX_RUN_ROWS:
                    by_tier.setdefault(r.tier, []).append(i)
            full = [(t, idx) for t, idx in by_tier.items() if len(idx) >= FANOUT]
            if not full:
                return
            tier, index = min(full)
            index = index[:FANOUT]
            parts = [self.runs[i] for i in index]
            merged = self._gather(parts, [np.arange(p.n) for p in parts], tier=tier + 1)
            self.runs = [r for i, r in enumerate(self.runs) if i not in index] + [merged]
            del parts
            release_memory()

    # -- undo -------------------------------------------------------------------------------------
    def mark(self) -> None:
        """Remember the table as it is (no run freezes or merges until :meth:`commit` or
        :meth:`rollback`); a new mark forgets the previous one."""
        if self._undo is not None:
            self.commit()
        self._undo = _Undo(self.delta.n, len(self.delta.text) if isinstance(self.delta.text, list) else 0,
                           had_per_val=bool(self.columns), had_sources=self.delta.source is not None)

    def commit(self) -> None:
        self._undo = None
        self._maybe_freeze()

    def rollback(self) -> None:
        undo, self._undo = self._undo, None
        if undo is None:
            raise LedgerError("rollback() without a mark(): nothing to return to")
        for r, rows, old in reversed(undo.changed):
            part = self.delta if r == -1 else self.runs[r]
            for name, values in old.items():
                if getattr(part, name) is not None:
                    getattr(part, name)[rows] = values
        d = self.delta
        d.keys[undo.delta_rows: d.n] = 0
        for name in self.COLUMNS:
            a = getattr(d, name)
            if a is not None:
                a[undo.delta_rows: d.n] = -1 if name == "source" else 0
        d.n = undo.delta_rows
        d.order = d.order[d.order < d.n]
        if isinstance(d.text, list):
            del d.text[undo.delta_text:]
        if not undo.had_per_val and self.columns:
            self.columns = 0
            for part in [d, *self.runs]:
                part.per_val = None
        if not undo.had_sources:
            for part in [d, *self.runs]:
                part.source = None
            self.sources, self._source_code = [], {}

    # -- reading --------------------------------------------------------------------------------
    def get(self, i: Id) -> dict[str, Any] | None:
        """One id's record (``None``: never added)."""
        keys, texts = self.keys_of([i]) if self.kind is not None else (None, None)
        if keys is None:
            return None
        loc = self.locate(keys, texts)
        if loc.run[0] == -2:
            return None
        part = self.delta if loc.run[0] == -1 else self.runs[loc.run[0]]
        return self._record(part, int(loc.row[0]), i)

    def lookup(self, ids: Sequence[Id]) -> dict[str, np.ndarray]:
        """Columns for a batch of ids, vectorized: ``found`` (bool), ``first``, ``second``
        (NaN where not found), ``count`` (0 where not found)."""
        n = len(ids)
        out = {"found": np.zeros(n, dtype=bool), "first": np.full(n, np.nan), "second": np.full(n, np.nan),
               "count": np.zeros(n, dtype=np.int64)}
        if not n or self.kind is None or any(isinstance(i, str) != (self.kind == "str") for i in ids):
            return out
        keys, texts = self.keys_of(ids)
        loc = self.locate(keys, texts)
        for r in np.unique(loc.run):
            if r == -2:
                continue
            part = self.delta if r == -1 else self.runs[r]
            pick = np.nonzero(loc.run == r)[0]
            rows = loc.row[pick]
            out["found"][pick] = True
            out["first"][pick], out["second"][pick], out["count"][pick] = part.first[rows], part.second[rows], part.count[rows]
        return out

    def _record(self, part: Run, row: int, i: Id) -> dict[str, Any]:
        code = -1 if part.source is None else int(part.source[row])
        return {
            "id": i, "value": float(part.first[row] + part.second[row]), "first_order": float(part.first[row]),
            "second_order": float(part.second[row]), "count": int(part.count[row]),
            "source": self.sources[code] if code >= 0 else None,
            "per_validation": None if part.per_val is None else part.per_val[row].copy(),
        }

    def partitions(self, rows: int, by_id: bool = False) -> Iterator[dict[str, Any]]:
        """The table in key order, one key range of about ``rows`` ids at a time: ``key``, ``id``
        (int64 array, or ``pyarrow`` strings), ``first``, ``second``, ``count`` (int64), ``source``
        (int32 codes into ``source_names``, -1 unset; or ``None``), ``per_val``. Equal keys stay in
        one range. ``by_id``: each range's rows in id order (str ids sorted as text, for people
        reading the files; int ids are in id order anyway). Peak memory: one range."""
        parts = [p for p in (*self.runs, self.delta) if p.n]
        total = sum(p.n for p in parts)
        if not total:
            return
        bounds = self._bounds(parts, max(1, -(-total // rows)))
        for lo, hi in itertools.pairwise(bounds):
            chosen, orders = [], []
            for p in parts:
                sk = p.sorted_keys()
                a, b = np.searchsorted(sk, lo, side="left"), np.searchsorted(sk, hi, side="left") if hi is not None else p.n
                if b > a:
                    chosen.append(p)
                    orders.append(np.arange(a, b) if p.order is None else p.order[a:b])
            if not chosen:
                continue
            run = self._gather(chosen, orders)
            if by_id and self.kind == "str" and run.n > 1:
                import pyarrow.compute as pc

                run = _permuted(run, pc.sort_indices(run.text).to_numpy())
            yield self._columns_of(run)

    def _columns_of(self, run: Run) -> dict[str, Any]:
        return {"key": run.keys, "id": run.text if self.kind == "str" else run.keys, "first": run.first,
                "second": run.second, "count": run.count.astype(np.int64), "source": run.source,
                "source_names": list(self.sources), "per_val": run.per_val}

    @staticmethod
    def _bounds(parts: list[Run], pieces: int) -> list[Any]:
        """Keys that cut the sorted union of ``parts`` into ``pieces`` ranges of about equal size,
        from a sample of every run (no union is formed): ``[b_k, b_k+1)``, the last open (``None``)."""
        if pieces <= 1:
            return [INT64.min, None]
        total = sum(p.n for p in parts)
        stride = max(1, total // (pieces * 64))
        samples = np.sort(np.concatenate([p.sorted_keys()[::stride] for p in parts]))
        cuts = np.unique(samples[(np.arange(1, pieces) * len(samples)) // pieces])
        return [INT64.min, *(int(c) for c in cuts if c > INT64.min), None]

    # -- building from saved partitions -------------------------------------------------------------
    def adopt(self, columns: dict[str, Any]) -> None:
        """Add one saved partition (sorted by key, as :meth:`partitions` gives it) as frozen runs,
        without copying it more than once."""
        keys = np.asarray(columns["key"], dtype=np.int64)
        if not len(keys):
            return
        if len(keys) > 1 and np.any(np.diff(keys) < 0):  # a partition in id order: sorted by key here
            import pyarrow as pa

            order = np.argsort(keys, kind="stable")
            columns = {k: (v[order] if isinstance(v, np.ndarray) else v) for k, v in columns.items()}
            if columns.get("text") is not None:
                columns["text"] = columns["text"].take(pa.array(order))
            keys = keys[order]
        kind = "str" if columns.get("text") is not None else "int"
        if self.kind is None:
            self.kind = kind
        elif self.kind != kind:
            raise LedgerError("saved partitions mix int and str ids")
        if columns.get("per_val") is not None and not self.columns:
            self._enable_per_val(columns["per_val"].shape[1])
        source = None
        if columns.get("source") is not None:
            # the partition's codes into its own names, mapped to the table's codes
            mapping = np.array([self._source_code.setdefault(s, len(self._source_code))
                                for s in columns["source_names"]] + [-1], dtype=np.int32)
            codes = np.asarray(columns["source"], dtype=np.int32)
            source = mapping[np.where(codes < 0, len(mapping) - 1, codes)]
            self.sources = list(self._source_code)
            for part in [self.delta, *self.runs]:
                if part.source is None:
                    part.source = np.full(len(part.keys), -1, dtype=np.int32)
        for a in range(0, len(keys), MAX_RUN_ROWS):
            b = min(len(keys), a + MAX_RUN_ROWS)
            run = Run(keys=keys[a:b], first=np.array(columns["first"][a:b], dtype=np.float64),  # writable copies
                      second=np.array(columns["second"][a:b], dtype=np.float64),
                      count=np.asarray(columns["count"][a:b], dtype=np.int32),
                      source=None if source is None else source[a:b],
                      per_val=None if columns.get("per_val") is None else columns["per_val"][a:b],
                      text=None if kind == "int" else columns["text"].slice(a, b - a), tier=99)
            if source is None and self.delta.source is not None:
                run.source = np.full(run.n, -1, dtype=np.int32)
            if self.columns and run.per_val is None:
                run.per_val = np.zeros((run.n, self.columns))
            self.runs.append(run)


def _permuted(run: Run, order: np.ndarray) -> Run:
    """The run's rows in another order (a copy)."""
    import pyarrow as pa

    def take(a: np.ndarray | None) -> np.ndarray | None:
        return None if a is None else a[order]

    return Run(keys=run.keys[order], first=run.first[order], second=run.second[order], count=run.count[order],
               source=take(run.source), per_val=take(run.per_val), text=run.text.take(pa.array(order)), tier=run.tier)
