"""The value table on disk: Parquet partitions by id range, written and read one at a time.

A table of up to :data:`PARTITION_ROWS` ids is one file, ``values.parquet`` (and
``per_validation.parquet``), as it always was. A larger one is cut into key ranges of about
:data:`PARTITION_ROWS` ids, ``values/part-00000.parquet`` ... (and ``per_validation/part-...``),
each sorted by key, and ``ledger.json`` lists every partition with its key range, row count,
size and SHA-256. So

* a save streams: one partition in memory at a time (:meth:`IdTable.partitions`), written
  atomically and checksummed;
* a load adopts each partition as frozen runs of the table, verified first;
* one id, or an id range (int ids), is read from the partitions whose key range holds it,
  without loading the rest (:func:`read_ids`, :func:`read_range`);
* tables saved by several processes (DDP or FSDP ranks) merge partition range by partition range
  (:func:`merge_saved`): each output range reads only the overlapping rows of each input.

Columns: ``id`` (int64 or string), ``value``, ``first_order``, ``second_order``, ``count``,
``source``; str-id partitions also ``key`` (the id's 64-bit hash, so that a load does not hash a
billion strings again). Rows are in key order: int ids ascending; str ids in hash order.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LedgerError
from ..files import IntegrityError, atomic_write, file_digest, verify_file
from .table import IdTable, hash_key, release_memory

PARTITION_ROWS = 1 << 20
VALUES_FILE = "values.parquet"
PER_VALIDATION_FILE = "per_validation.parquet"
VALUES_DIR = "values"
PER_VALIDATION_DIR = "per_validation"


def _arrow_tables(cols: Mapping[str, Any], kind: str, validation_names: Sequence[str] | None,
                  keys: bool = True) -> tuple[Any, Any]:
    """A partition's columns (from :meth:`IdTable.partitions`) as the values table and the
    per-validation table (or ``None``); ``keys``: str ids' keys as a column (a partition of a
    large table; the one file of a small table is as it always was, its ids hashed on load)."""
    import pyarrow as pa

    ids = cols["id"] if kind == "str" else pa.array(cols["id"], type=pa.int64())
    first, second = cols["first"], cols["second"]
    if cols["source"] is None:
        source = pa.nulls(len(first), type=pa.string())
    else:
        codes = cols["source"]
        dictionary = pa.array(cols["source_names"], type=pa.string())
        source = pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), dictionary).cast(pa.string())
    table = {"id": ids, "value": first + second, "first_order": first, "second_order": second,
             "count": cols["count"], "source": source}
    if kind == "str" and keys:
        table["key"] = pa.array(cols["key"], type=pa.int64())
    per_val = None
    if cols["per_val"] is not None:
        pv = cols["per_val"]
        names = list(validation_names or [f"val_{k}" for k in range(pv.shape[1])])
        per_val = pa.table({"id": ids, **{str(n): pv[:, k] for k, n in enumerate(names)}})
    return pa.table(table), per_val


def write_values(table: IdTable, directory: Path, *, validation_names: Sequence[str] | None = None,
                 fsync: bool = True, rows: int | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write the table into ``directory``; returns ``(files, partitions)`` for ``ledger.json``:
    each file's digest, and each partition's file, row count and key range. Peak memory: one
    partition. Partitions of an earlier save that this one does not list are removed."""
    import pyarrow.parquet as pq

    rows = int(rows or PARTITION_ROWS)
    single = len(table) <= rows
    files: dict[str, Any] = {}
    partitions: list[dict[str, Any]] = []
    pieces: Iterator[dict[str, Any]] = table.partitions(rows if not single else max(1, len(table)), by_id=True)
    kind = table.kind or "int"
    for k, cols in enumerate(pieces):
        values, per_val = _arrow_tables(cols, kind, validation_names, keys=not single)
        name = VALUES_FILE if single else f"{VALUES_DIR}/part-{k:05d}.parquet"
        atomic_write(directory / name, lambda p, t=values: pq.write_table(t, p), fsync=fsync, sync_dir=False)
        files[name] = file_digest(directory / name)
        entry = {"file": name, "rows": values.num_rows, "lo": int(cols["key"].min()), "hi": int(cols["key"].max())}
        if per_val is not None:
            pv_name = PER_VALIDATION_FILE if single else f"{PER_VALIDATION_DIR}/part-{k:05d}.parquet"
            atomic_write(directory / pv_name, lambda p, t=per_val: pq.write_table(t, p), fsync=fsync, sync_dir=False)
            files[pv_name] = file_digest(directory / pv_name)
            entry["per_validation"] = pv_name
        partitions.append(entry)
    if not partitions:  # an empty table: the one file, empty
        values, _ = _arrow_tables({"id": [], "key": np.zeros(0, dtype=np.int64), "first": np.zeros(0),
                                   "second": np.zeros(0), "count": np.zeros(0, dtype=np.int64), "source": None,
                                   "per_val": None}, kind, None)
        atomic_write(directory / VALUES_FILE, lambda p: pq.write_table(values, p), fsync=fsync, sync_dir=False)
        files[VALUES_FILE] = file_digest(directory / VALUES_FILE)
        partitions.append({"file": VALUES_FILE, "rows": 0, "lo": 0, "hi": -1})
    _remove_stale(directory, files)
    return files, partitions


def _remove_stale(directory: Path, files: Mapping[str, Any]) -> None:
    for sub in (VALUES_DIR, PER_VALIDATION_DIR):
        for old in (directory / sub).glob("part-*.parquet") if (directory / sub).is_dir() else ():
            if f"{sub}/{old.name}" not in files:
                old.unlink(missing_ok=True)
    for single in (VALUES_FILE, PER_VALIDATION_FILE):
        if single not in files and (directory / single).exists() and any(f.startswith(VALUES_DIR) for f in files):
            (directory / single).unlink(missing_ok=True)


def _read_parquet(path: Path, columns: list[str] | None = None) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowException) as exc:
        raise IntegrityError(f"{path} cannot be read as Parquet ({' '.join(str(exc).split())[:160]})") from None


def partition_columns(directory: Path, entry: Mapping[str, Any], files: Mapping[str, Any],
                      keys_in: tuple[int, int] | None = None) -> dict[str, Any]:
    """One partition read back (verified against ``files``) as :meth:`IdTable.adopt` takes it,
    in key order (files of older versions, in arrival order, are sorted here); ``keys_in``: only
    the rows with keys in ``[lo, hi)``."""
    import pyarrow as pa
    import pyarrow.compute as pc

    name = entry["file"]
    verify_file(directory / name, files[name], "listed in ledger.json")
    import pyarrow.parquet as pq

    present = set(pq.read_schema(directory / name).names)
    t = _read_parquet(directory / name, [c for c in ("id", "key", "first_order", "second_order", "count", "source")
                                         if c in present])
    ids = t.column("id")
    text = None
    if pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        text = ids.combine_chunks().cast(pa.string())
        keys = (t.column("key").to_numpy() if "key" in t.column_names
                else np.fromiter((hash_key(s) for s in text.to_pylist()), dtype=np.int64, count=len(text)))
    else:
        keys = ids.to_numpy().astype(np.int64, copy=False)
    source = t.column("source").combine_chunks()
    if not pa.types.is_dictionary(source.type):
        source = source.dictionary_encode()
    codes = pc.fill_null(source.indices, -1).to_numpy().astype(np.int32)
    cols: dict[str, Any] = {
        "key": keys, "text": text, "first": t.column("first_order").to_numpy(),
        "second": t.column("second_order").to_numpy(), "count": t.column("count").to_numpy(),
        "source": codes if (codes >= 0).any() else None, "source_names": source.dictionary.to_pylist(),
        "per_val": None,
    }
    pv_name = entry.get("per_validation")
    if pv_name is not None:
        verify_file(directory / pv_name, files[pv_name], "listed in ledger.json")
        pv = _read_parquet(directory / pv_name)
        if not pv.column("id").equals(t.column("id")):
            raise IntegrityError(f"{pv_name} ids do not match {name} in {directory}")
        cols["per_val"] = np.stack([pv.column(c).to_numpy() for c in pv.column_names if c != "id"], axis=1)
    order = np.argsort(keys, kind="stable") if len(keys) > 1 and np.any(np.diff(keys) < 0) else None
    if keys_in is not None:
        order = np.arange(len(keys)) if order is None else order
        chosen = keys[order]
        inside = chosen >= max(keys_in[0], -(2**63))
        if keys_in[1] < 2**63:  # (a range open to the top ends past the largest int64)
            inside &= chosen < keys_in[1]
        order = order[inside]
    if order is not None:
        for k in ("key", "first", "second", "count", "source", "per_val"):
            if cols[k] is not None:
                cols[k] = cols[k][order]
        if text is not None:
            cols["text"] = text.take(pa.array(order))
    return cols


def read_values(directory: Path, partitions: Sequence[Mapping[str, Any]], files: Mapping[str, Any]) -> IdTable:
    """The saved table, verified and adopted partition by partition."""
    table = IdTable()
    for entry in partitions:
        if entry.get("rows", 1):
            table.adopt(partition_columns(directory, entry, files))
            release_memory()  # the partition's Arrow buffers not kept (the value column, int64 counts)
    return table


def _holding(partitions: Sequence[Mapping[str, Any]], lo: int, hi: int) -> list[Mapping[str, Any]]:
    return [e for e in partitions if e.get("rows", 1) and int(e["lo"]) <= hi and int(e["hi"]) >= lo]


def read_ids(directory: Path, partitions: Sequence[Mapping[str, Any]], files: Mapping[str, Any],
             ids: Sequence[Any]) -> dict[Any, dict[str, Any]]:
    """The records of ``ids`` (those saved), reading only the partitions that hold them."""
    probe = IdTable()
    keys, _ = probe.keys_of(list(ids))
    out: dict[Any, dict[str, Any]] = {}
    for entry in _holding(partitions, int(keys.min()), int(keys.max())) if len(keys) else []:
        table = IdTable()
        table.adopt(partition_columns(directory, entry, files))
        for i in ids:
            record = table.get(i) if table.kind == probe.kind else None
            if record is not None:
                out[i] = record
    return out


def read_range(directory: Path, partitions: Sequence[Mapping[str, Any]], files: Mapping[str, Any],
               lo: int, hi: int) -> Any:
    """``pyarrow.Table`` of the int ids in ``[lo, hi]`` (inclusive), in id order, reading only the
    partitions whose range overlaps."""
    import pyarrow as pa

    parts = []
    for entry in _holding(partitions, lo, hi):
        verify_file(directory / entry["file"], files[entry["file"]], "listed in ledger.json")
        t = _read_parquet(directory / entry["file"])
        if not pa.types.is_integer(t.column("id").type):
            raise LedgerError("id ranges are read from int ids; str ids are stored by hash: read them by id")
        ids = t.column("id").to_numpy()
        parts.append(t.filter(pa.array((ids >= lo) & (ids <= hi))))
    if not parts:
        return None
    return pa.concat_tables(parts)


def merge_saved(sources: Sequence[tuple[Path, Sequence[Mapping[str, Any]], Mapping[str, Any]]], directory: Path,
                *, rows: int | None = None, validation_names: Sequence[str] | None = None, fsync: bool = True,
                part: tuple[int, int] = (0, 1)) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Tables saved apart (one per rank: ``(directory, partitions, files)``) as one, summing by id,
    written into ``directory``. Output key ranges are cut from the inputs' ranges; each reads
    the overlapping rows of every input only, so memory holds one output range. ``part=(i, n)``
    writes only the output ranges ``i, i + n, ...`` (rank ``i`` of ``n`` merging in parallel);
    the caller joins the returned lists."""
    import pyarrow.parquet as pq

    rows = int(rows or PARTITION_ROWS)
    bounds = _merged_bounds([e for _, partitions, _ in sources for e in partitions], rows)
    files: dict[str, Any] = {}
    out: list[dict[str, Any]] = []
    kind = None
    for k, (lo, hi) in enumerate(itertools.pairwise(bounds)):
        if k % part[1] != part[0]:
            continue
        merged = IdTable()
        for src, partitions, src_files in sources:
            for entry in _holding(partitions, lo, hi - 1):
                cols = partition_columns(src, entry, src_files, keys_in=(lo, hi))
                if len(cols["key"]):
                    _add_saved(merged, cols)
        kind = merged.kind or kind
        if not len(merged):
            continue
        for cols in merged.partitions(max(1, len(merged))):
            values, per_val = _arrow_tables(cols, merged.kind, validation_names)
            name = f"{VALUES_DIR}/part-{k:05d}.parquet"
            atomic_write(directory / name, lambda p, t=values: pq.write_table(t, p), fsync=fsync, sync_dir=False)
            files[name] = file_digest(directory / name)
            entry = {"file": name, "rows": values.num_rows, "lo": int(cols["key"][0]), "hi": int(cols["key"][-1])}
            if per_val is not None:
                pv_name = f"{PER_VALIDATION_DIR}/part-{k:05d}.parquet"
                atomic_write(directory / pv_name, lambda p, t=per_val: pq.write_table(t, p), fsync=fsync,
                             sync_dir=False)
                files[pv_name] = file_digest(directory / pv_name)
                entry["per_validation"] = pv_name
            out.append(entry)
    return files, out


def _add_saved(table: IdTable, cols: Mapping[str, Any]) -> None:
    """Add a saved partition's sums and counts into ``table``; a source label already there stays
    (the first input's label wins)."""
    ids = cols["text"].to_pylist() if cols["text"] is not None else cols["key"].tolist()
    table.add(ids, cols["first"], cols["second"], cols["per_val"], count=cols["count"])
    if cols["source"] is not None:
        keep = cols["source"] >= 0
        names = cols["source_names"]
        table.set_sources([i for i, k in zip(ids, keep) if k], [names[c] for c in cols["source"][keep]],
                          only_unset=True)


def _merged_bounds(entries: Sequence[Mapping[str, Any]], rows: int) -> list[int]:
    """Output key ranges ``[b_k, b_k+1)`` over the inputs' partitions: their boundaries, grouped
    so that each range holds about ``rows`` input rows."""
    edges = sorted({int(e["lo"]) for e in entries if e.get("rows", 1)} | {int(e["hi"]) + 1 for e in entries
                                                                          if e.get("rows", 1)})
    if not edges:
        return [0, 1]
    bounds = [edges[0]]
    acc = 0.0
    for a, b in itertools.pairwise(edges):
        acc += sum(int(e["rows"]) * _overlap(e, a, b) for e in entries if e.get("rows", 1))
        if acc >= rows:
            bounds.append(b)
            acc = 0.0
    if bounds[-1] != edges[-1]:
        bounds.append(edges[-1])
    return bounds


def _overlap(entry: Mapping[str, Any], a: int, b: int) -> float:
    """The share of a partition's key range inside ``[a, b)`` (its rows assumed spread evenly)."""
    lo, hi = int(entry["lo"]), int(entry["hi"]) + 1
    width = max(1, hi - lo)
    return max(0, min(b, hi) - max(a, lo)) / width


def total_rows(partitions: Sequence[Mapping[str, Any]]) -> int:
    return sum(int(e.get("rows", 0)) for e in partitions)


def listed_files(partitions: Sequence[Mapping[str, Any]]) -> list[str]:
    return [n for e in partitions for n in (e["file"], e.get("per_validation")) if n]

