"""Values handed to curators' pipelines, keyed by document id.

* **Dolma attribute files** (:func:`write_dolma_attributes`): for every document file
  (``documents/**/*.jsonl[.gz]``, one JSON document with an ``id`` per line), an attribute file
  at the same place under ``attributes/<name>/``, with the same rows in the same order, as Dolma's
  mixer expects: ``{"id": ..., "attributes": {"<name>__value": [[0, len(text), value]],
  "<name>__count": [[0, len(text), count]]}}`` (a document never valued has ``count`` 0 and no
  value). Documents stream through in batches; the values come from the table in memory.
* **Document metadata** (:func:`annotate`): objects with ``id`` and a ``metadata`` dict, such as
  datatrove's ``Document``, get ``metadata["inrun_value"]`` and ``["inrun_count"]``.
* Parquet partitions keyed by id are the store's own format (:mod:`inrun.store.partitions`), and a
  ``datasets`` column is :meth:`ValueTable.to_dataset`.
"""

from __future__ import annotations

import gzip
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import LedgerError
from ..files import atomic_write
from .table import IdTable

BATCH = 1 << 16


def _open_text(path: Path | str, mode: str = "r", gz: bool | None = None) -> io.TextIOBase:
    """A text file, gzip-compressed when its name (or ``gz``) says so."""
    if gz if gz is not None else str(path).endswith(".gz"):
        return gzip.open(path, mode + "t", encoding="utf-8")
    return open(path, mode, encoding="utf-8")


def _document_files(documents: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(documents, (str, os.PathLike)):
        root = Path(documents)
        if root.is_file():
            return [root]
        files = sorted(p for p in root.rglob("*") if p.is_file() and (p.name.endswith((".jsonl", ".json.gz",
                                                                                        ".jsonl.gz", ".json"))))
        if not files:
            raise LedgerError(f"{root} holds no document files (*.jsonl, *.jsonl.gz, *.json.gz)")
        return files
    return [Path(p) for p in documents]


def attribute_path(document: Path, name: str, destination: Path | None = None, root: Path | None = None) -> Path:
    """Where Dolma keeps ``document``'s attributes called ``name``: the path with its ``documents``
    directory replaced by ``attributes/<name>`` (or under ``destination``, relative to ``root``)."""
    if destination is not None:
        rel = document.relative_to(root) if root is not None else Path(document.name)
        return destination / rel
    parts = document.parts
    if "documents" not in parts:
        raise LedgerError(
            f"{document} is not under a 'documents' directory (Dolma's layout): pass destination= "
            "for the attribute files"
        )
    k = len(parts) - 1 - parts[::-1].index("documents")
    return Path(*parts[:k], "attributes", name, *parts[k + 1:])


def _batches(lines: Iterable[str], size: int) -> Iterator[list[dict[str, Any]]]:
    batch: list[dict[str, Any]] = []
    for line in lines:
        if line.strip():
            batch.append(json.loads(line))
            if len(batch) >= size:
                yield batch
                batch = []
    if batch:
        yield batch


def _key(table: IdTable, doc_id: Any) -> Any:
    if table.kind == "int" and isinstance(doc_id, str) and doc_id.lstrip("-").isdigit():
        return int(doc_id)
    return doc_id


def _table_of(values: Any) -> IdTable:
    """The id table of a :class:`~inrun.ValueLedger` (``tracker.ledger``, a loaded ledger), or the table."""
    table = getattr(values, "table", values)
    if not isinstance(table, IdTable):
        raise TypeError(f"values must be a ValueLedger (tracker.ledger, ValueLedger.load(...)), got {type(values).__name__}")
    return table


def write_dolma_attributes(
    values: Any, documents: str | os.PathLike | Sequence[str | os.PathLike], name: str = "inrun", *,
    destination: str | os.PathLike | None = None, id_field: str = "id", batch: int = BATCH,
) -> list[Path]:
    """Attribute files for every document file (see the module docstring); returns their paths.
    Each is written atomically (gzip if the document file is). ``values``: a ``ValueLedger``."""
    table = _table_of(values)
    files = _document_files(documents)
    root = Path(documents) if isinstance(documents, (str, os.PathLike)) and Path(documents).is_dir() else None
    dest = Path(destination) if destination is not None else None
    written = []
    for doc in files:
        target = attribute_path(doc, name, dest, root)

        def write(tmp: str, doc: Path = doc) -> None:
            with _open_text(tmp, "w", gz=doc.suffix == ".gz") as out, _open_text(doc) as lines:
                for rows in _batches(lines, batch):
                    ids = [_key(table, r.get(id_field)) for r in rows]
                    if any(i is None for i in ids):
                        raise LedgerError(f"{doc}: a document has no {id_field!r} field")
                    found = table.lookup(ids)
                    value = found["first"] + found["second"]
                    for k, r in enumerate(rows):
                        n = len(r.get("text", ""))
                        attrs: dict[str, Any] = {f"{name}__count": [[0, n, int(found["count"][k])]]}
                        if found["found"][k] and np.isfinite(value[k]):
                            attrs[f"{name}__value"] = [[0, n, float(value[k])]]
                        out.write(json.dumps({"id": r[id_field], "attributes": attrs}) + "\n")

        atomic_write(target, write)
        written.append(target)
    return written


def annotate(documents: Iterable[Any], values: Any, key: str = "inrun_value", batch: int = BATCH) -> Iterator[Any]:
    """Each document (``.id``, ``.metadata``) with its value and count in its metadata, in order;
    ``NaN`` and 0 for documents never valued. ``values``: a ``ValueLedger``."""
    table = _table_of(values)
    pending: list[Any] = []

    def flush() -> Iterator[Any]:
        found = table.lookup([_key(table, d.id) for d in pending])
        for k, d in enumerate(pending):
            d.metadata[key] = float(found["first"][k] + found["second"][k]) if found["found"][k] else float("nan")
            d.metadata[key.replace("value", "count") if "value" in key else f"{key}_count"] = int(found["count"][k])
            yield d

    for d in documents:
        pending.append(d)
        if len(pending) >= batch:
            yield from flush()
            pending = []
    if pending:
        yield from flush()
