"""Your own data: JSONL, plain text or Parquet files.

* ``.jsonl``: one JSON object per line with an ``id`` (int or str, unique), optionally a
  ``source``, and either a ``text`` or numeric feature columns plus a label (names configurable).
* ``.parquet``: the same columns.
* ``.txt``: one example per non-empty line; the id is the line number (1-based) and the source
  is the file's name.

Text is tokenized as bytes (see :mod:`inrun.data.base`). Tabular features are standardized with
the training rows' mean and deviation (NaN-aware, so a corrupt row stays confined to itself).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import DataError, ExampleSet, check_unique_ids, encode_texts, preview_text


@dataclass
class Record:
    """One row of a file, with where it came from."""

    fields: dict[str, Any]
    location: str


def read_records(path: str | Path, id_field: str = "id") -> list[Record]:
    """Rows of a ``.jsonl``, ``.txt`` or ``.parquet`` file.

    Raises:
        DataError: the file is missing, a line is not a JSON object, or an id is missing.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    suffix = path.suffix.lower()
    records: list[Record] = []
    if suffix == ".txt":
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                records.append(Record({id_field: n, "text": line, "source": path.stem}, f"{path.name}:{n}"))
        return records
    if suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{path.name}:{n}: not valid JSON ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{path.name}:{n}: expected a JSON object, got {type(row).__name__}")
                records.append(Record(row, f"{path.name}:{n}"))
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for n, row in enumerate(pq.read_table(path).to_pylist()):
            records.append(Record(row, f"{path.name}[{n}]"))
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .txt or .parquet")
    for rec in records:
        if id_field not in rec.fields or rec.fields[id_field] is None:
            raise DataError(f"{rec.location}: no '{id_field}' field (every example needs a unique id)")
    return records


def text_examples(
    records: Sequence[Record], length: int, id_field: str, text_field: str, source_field: str
) -> ExampleSet:
    """Byte-token examples from records with a text field."""
    texts = []
    for rec in records:
        text = rec.fields.get(text_field)
        if not isinstance(text, str) or not text:
            raise DataError(f"{rec.location}: '{text_field}' must be a non-empty string, got {text!r}")
        texts.append(text)
    ids = check_unique_ids([r.fields[id_field] for r in records], "data")
    inputs, targets = encode_texts(texts, length)
    return ExampleSet(
        ids=ids,
        sources=[_source(r, source_field) for r in records],
        inputs=inputs,
        targets=targets,
        previews=[preview_text(t) for t in texts],
        locations=[r.location for r in records],
        task="lm",
    )


def tabular_examples(
    records: Sequence[Record],
    features: Sequence[str],
    label_field: str,
    classes: Sequence[Any],
    id_field: str,
    source_field: str,
) -> ExampleSet:
    """Feature/label examples (features not yet standardized)."""
    index = {c: k for k, c in enumerate(classes)}
    X = np.empty((len(records), len(features)), dtype=np.float64)
    y = np.empty(len(records), dtype=np.int64)
    for r, rec in enumerate(records):
        for k, name in enumerate(features):
            v = rec.fields.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise DataError(f"{rec.location}: feature '{name}' must be a number, got {v!r}")
            X[r, k] = v
        label = rec.fields.get(label_field)
        if label not in index:
            raise DataError(f"{rec.location}: label '{label_field}' is {label!r}, not one of {list(classes)}")
        y[r] = index[label]
    ids = check_unique_ids([r.fields[id_field] for r in records], "data")
    previews = [
        f"{rec.fields[label_field]}: " + ", ".join(f"{n}={_fmt(rec.fields[n])}" for n in features)
        for rec in records
    ]
    return ExampleSet(
        ids=ids,
        sources=[_source(r, source_field) for r in records],
        inputs=torch.tensor(X, dtype=torch.float64),
        targets=torch.tensor(y),
        previews=[preview_text(p) for p in previews],
        locations=[r.location for r in records],
        task="classify",
        num_classes=len(classes),
    )


def label_classes(records: Sequence[Record], label_field: str) -> list[Any]:
    """Sorted distinct labels (int or str) found in ``records``."""
    labels = set()
    for rec in records:
        v = rec.fields.get(label_field)
        if v is None or isinstance(v, (bool, float, dict, list)):
            raise DataError(f"{rec.location}: label '{label_field}' must be an int or str, got {v!r}")
        labels.add(v)
    if len({type(v) for v in labels}) > 1:
        raise DataError(f"labels in '{label_field}' mix int and str")
    return sorted(labels)


def standardize(train: ExampleSet, *others: ExampleSet) -> None:
    """Scale float features in place with the training rows' NaN-aware mean and deviation."""
    X = train.inputs.numpy()
    with np.errstate(all="ignore"):
        mean = np.nanmean(X, axis=0)
        std = np.nanstd(X, axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 0), std, 1.0)
    for s in (train, *others):
        s.inputs = ((s.inputs - torch.from_numpy(mean)) / torch.from_numpy(std)).to(torch.float32)


def _source(rec: Record, field: str) -> str | None:
    v = rec.fields.get(field)
    return None if v is None else str(v)


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) and math.isfinite(v) else str(v)


def read_id_list(path: str | Path) -> list[Any]:
    """Ids from a ``.parquet`` file (column ``id``) or a ``.txt`` file (one per line)."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"id list {path} does not exist")
    if path.suffix.lower() == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        if "id" not in table.column_names:
            raise DataError(f"{path}: no 'id' column")
        return table.column("id").to_pylist()
    if path.suffix.lower() == ".txt":
        out: list[Any] = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                out.append(int(line) if line.lstrip("-").isdigit() else line)
        return out
    raise DataError(f"{path}: an id list must be .parquet (column 'id') or .txt (one id per line)")
